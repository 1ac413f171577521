"""Config files (YAML or TOML) into flat, validated dataclasses.

One schema for services and clients: a file has sections (``backbone``, ``server``,
``training``, ...), each a flat mapping whose keys are the fields of one dataclass.
Unknown keys, wrong types and invalid values are errors that name the section, the
field and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_config(path: Path) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml`` or ``.toml`` file."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    return data


def section(config: Mapping[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        if required:
            raise ValueError(f"config has no [{name}] section")
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"config section [{name}] must be a mapping of fields")
    return dict(value)


def _coerce(where: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(where, option, value)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} is not a valid {tp}")
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ValueError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(where, item, v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """``cls(**values)`` with field names and types checked, errors naming the field."""
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"[{where}] has no field {unknown[0]!r}; the fields are {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _coerce(f"[{where}] {name}", hints[name], value) for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"[{where}] {exc}") from None
    except ValueError as exc:
        raise ValueError(f"[{where}] {exc}") from None
