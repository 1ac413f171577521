"""What every ``to_proto`` / ``from_proto`` of the contract's dataclasses does: copy the
plain fields (scalars and repeated scalars, not enums, not messages) that a dataclass and
its protobuf message share by name; a repeated field is a tuple in the dataclass. The
other fields each method converts itself and passes as ``values``."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)
T = TypeVar("T")


def _plain_fields(
    message_type: type[Message], cls: type, values: dict[str, Any]
) -> dict[str, bool]:
    """The names of the plain fields to copy, each with whether it is repeated."""
    shared = {f.name for f in dataclasses.fields(cls)} - values.keys()
    return {
        f.name: f.is_repeated
        for f in message_type.DESCRIPTOR.fields
        if f.name in shared and f.enum_type is None and f.message_type is None
    }


def to_message(obj: Any, message_type: type[M], **values: Any) -> M:
    """A ``message_type`` holding the plain fields of the dataclass ``obj`` it shares by
    name, and ``values``."""
    names = _plain_fields(message_type, type(obj), values)
    return message_type(**{name: getattr(obj, name) for name in names}, **values)


def from_message(cls: type[T], message: Message, **values: Any) -> T:
    """A ``cls`` (a dataclass) holding the plain fields of ``message`` it shares by name
    (a repeated one as a tuple), and ``values``; the fields neither gives take their
    defaults."""
    copied = {}
    for name, repeated in _plain_fields(type(message), cls, values).items():
        value = getattr(message, name)
        copied[name] = tuple(value) if repeated else value
    return cls(**copied, **values)
