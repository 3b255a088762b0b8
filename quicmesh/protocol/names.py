"""Node and mesh names: DNS labels, so they fit in URIs, DNS names and file names alike."""

from __future__ import annotations

import re

from quicmesh.errors import InvalidNameError

NAME_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def validate_name(name: object, kind: str = "node") -> str:
    """Return ``name`` if it is a valid node/mesh name, else raise InvalidNameError saying why."""
    if is_valid_name(name):
        return name  # type: ignore[return-value]
    return _raise(name, kind)


def _raise(name: object, kind: str) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"{kind} name must be a string, got {type(name).__name__}")
    if not name:
        reason = "it is empty"
    elif len(name) > 63:
        reason = f"it is {len(name)} characters long (at most 63)"
    elif name != name.lower():
        reason = "it has upper-case letters (use lower case)"
    elif name[0] == "-" or name[-1] == "-":
        reason = "it starts or ends with '-'"
    else:
        reason = "only a-z, 0-9 and '-' are allowed"
    raise InvalidNameError(f"invalid {kind} name {name!r}: {reason}")
