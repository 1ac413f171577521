"""Logging setup: text for people, JSON lines for clusters, and the ids of what a line
is about (session, federation, round) on every record.

Code that works for a session or a round wraps the work in :func:`log_context`; every
record logged inside it, by any module, carries those fields (:class:`ContextFilter`).
The text format appends them as ``[session=... round=...]``; the JSON format has them
as keys. Context lives in a :mod:`contextvars` variable, so threads and gRPC calls do
not see each other's.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

FORMATS = ("text", "json")
# Context fields, in the order the text format prints them.
FIELDS = ("session", "federation", "round")

_CONTEXT: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "splitfed_log_context", default=None
)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s%(context)s"
# Characters of a session id a log line may show: enough to tell sessions apart in one
# deployment, far too few to use one (a session id is a capability, 96 random bits).
SESSION_ID_SHOWN = 8


def redact(session_id: str) -> str:
    """A session id as logs and refusals show it: its first characters and an ellipsis
    (session ids are capabilities: whoever holds one may use the session)."""
    if len(session_id) <= SESSION_ID_SHOWN:
        return session_id
    return session_id[:SESSION_ID_SHOWN] + "..."


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (e.g. ``session=...``) to every record logged inside; nests. A
    session id is shown redacted (:func:`redact`)."""
    if isinstance(fields.get("session"), str):
        fields["session"] = redact(fields["session"])
    token = _CONTEXT.set({**current_context(), **{k: v for k, v in fields.items() if v != ""}})
    try:
        yield
    finally:
        # A generator closed from another thread (garbage collection) cannot reset here;
        # that thread's context never had the fields.
        with contextlib.suppress(ValueError):
            _CONTEXT.reset(token)


def current_context() -> Mapping[str, Any]:
    return _CONTEXT.get() or {}


class ContextFilter(logging.Filter):
    """Puts the current :func:`log_context` on each record: ``record.context_fields``
    (a dict) and ``record.context`` (`` [k=v ...]`` or empty, for text formats)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(current_context())
        record.context_fields = fields
        ordered = [k for k in FIELDS if k in fields] + sorted(set(fields) - set(FIELDS))
        text = " ".join(f"{k}={fields[k]}" for k in ordered)
        record.context = f" [{text}]" if text else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the
    context fields, and the traceback as ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = getattr(record, "context_fields", None)
        if context is None:
            context = dict(current_context())
        for key, value in context.items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once per process: ``level`` and ``fmt`` (text, json)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
