"""Structured logging for the daemon: one event per line, as `key=value` text or as JSON.

Operators grep text logs and ship JSON logs to a collector; both carry the same fields. A log call
passes its fields with ``extra=fields(peer="beta", reason="...")`` so the message stays a fixed,
searchable event name ("peer connected") and the variable parts become fields.
Never pass key material as a field: these lines end up in journals and log collectors.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from ``extra`` and is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def fields(**values: Any) -> dict[str, Any]:
    """The ``extra=`` argument that attaches ``values`` as structured fields to one log line."""
    return {"fields": values}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    values = dict(getattr(record, "fields", {}) or {})
    for name, value in vars(record).items():  # a plain ``extra={"k": v}`` from other modules
        if name not in _RECORD_ATTRIBUTES and name != "fields":
            values.setdefault(name, value)
    return values


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c.isspace() or c in '="' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2025-01-02T03:04:05.678Z INFO quicmesh.ops.daemon: peer connected peer=beta rtt=0.001``"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts += [f"{key}={_text_value(value)}" for key, value in _record_fields(record).items()
                  if value is not None]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``msg``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname.lower(),
                                 "logger": record.name, "msg": record.getMessage()}
        for key, value in _record_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_handler: logging.Handler | None = None


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``fmt``; safe to call again
    (SIGHUP may change the level or format)."""
    global _handler
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream or sys.stderr)
    _handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(_handler)
    root.setLevel(level.upper())
    # aioquic logs every connection's life at INFO; the node already logs what operators need.
    logging.getLogger("quic").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
