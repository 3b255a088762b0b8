"""How a value a user wrote shows in an error message: as TOML would write it, or as its kind.

Shared by the config parser and the fingerprint normaliser so that both quote bad input alike.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string, control characters escaped."""
    def escape(c: str) -> str:
        if c in _ESCAPES:
            return _ESCAPES[c]
        return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c

    return '"' + "".join(escape(c) for c in text) + '"'


def show(value: object) -> str:
    """A bad value as the user wrote it in TOML, or its kind when that would not help."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return f"a {type(value).__name__}"
