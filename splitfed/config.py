"""Config files (YAML or TOML) into flat, validated dataclasses.

One schema for services and clients: a file has sections (``backbone``, ``server``,
``training``, ...), each a flat mapping whose keys are the fields of one dataclass.
Unknown keys, wrong types and invalid values are errors that name the section, the
field and what would be accepted.

Every field can be overridden without editing the file, in this order (later wins):
the file, environment variables ``SPLITFED__SECTION__FIELD=value`` (a nested table:
``SPLITFED__TRAINING__PERTURBATION__SIGMA``), and ``--set section.field=value`` on the
command line. Values are read as YAML scalars or lists (``3``, ``1e-4``, ``true``,
``[q_proj, v_proj]``, ``"text"``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from splitfed.files import StrPath

T = TypeVar("T")

ENV_PREFIX = "SPLITFED__"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# ``--set`` values of the command being run (the CLI sets them; read_config applies them).
OVERRIDES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "splitfed_config_overrides", default=()
)


def _value(text: str) -> Any:
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-4" as a string
    return value


def _assign(data: dict[str, Any], path: Sequence[str], value: Any, origin: str) -> None:
    node = data
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ValueError(f"{origin}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(
    data: dict[str, Any],
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``data`` with the environment's ``SPLITFED__...`` variables, then ``overrides``
    (``section.field=value``), applied in place."""
    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if len(path) < 2 or not all(path):
            raise ValueError(
                f"environment variable {name}: expected {ENV_PREFIX}SECTION__FIELD=value"
            )
        _assign(data, path, _value(environ[name]), f"environment variable {name}")
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ValueError(
                f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. training.max_steps=10"
            )
        _assign(data, path, _value(text), f"--set {item!r}")
    return data


def read_config(path: StrPath, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml`` or ``.toml`` file, with the environment's and
    the command line's overrides (``overrides``; default: the running command's
    ``--set`` options)."""
    path = Path(path)
    data = _read_file(path)
    return apply_overrides(data, OVERRIDES.get() if overrides is None else overrides)


def _read_file(path: Path) -> dict[str, Any]:
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
