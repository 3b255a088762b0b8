"""Field codec shared by announcements and membership messages: length-prefixed bytes, names, counts.

Pure (no cryptography), so that messages.py stays light. Readers raise only ProtocolError; writers raise
ValueError, since what they get is this node's own data.
"""

from __future__ import annotations

from quicmesh.errors import ProtocolError
from quicmesh.protocol.names import is_valid_name
from quicmesh.protocol.wire.common import ErrorCode, _Reader, encode_varint

MAX_ANNOUNCEMENT_SIZE = 24 * 1024
"""Largest encoded announcement; bounds what a peer can make a node parse and verify."""


def violation(message: str) -> ProtocolError:
    return ProtocolError(message, code=ErrorCode.PROTOCOL_VIOLATION)


class FieldReader(_Reader):
    """The wire payload reader plus the membership field forms."""

    __slots__ = ()

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise violation(f"truncated {self.what}")
        self.pos += 1
        return self.buf[self.pos - 1]

    def blob(self, low: int, high: int, what: str) -> bytes:
        """A varint length of ``low..high``, then that many bytes."""
        length = self.varint()
        if not low <= length <= high:
            raise violation(f"{self.what}: {what} of {length} bytes (expected {low}..{high})")
        if length > self.remaining():
            raise violation(f"truncated {self.what} ({what})")
        self.pos += length
        return bytes(self.buf[self.pos - length : self.pos])

    def name(self, what: str) -> str:
        """A length-prefixed node/service name (a DNS label)."""
        raw = self.blob(1, 63, what)
        name = raw.decode("ascii", "replace")
        if not is_valid_name(name):
            raise violation(f"{self.what}: {what} is not a valid name")
        return name

    def count(self, high: int, min_entry_size: int, what: str) -> int:
        """A count of entries that is at most ``high`` and fits the bytes left (no huge loops on a lie)."""
        count = self.varint()
        if count > high or count * min_entry_size > self.remaining():
            raise violation(f"{self.what} claims {count} {what} (at most {high}, and they must fit the bytes left)")
        return count


def blob(data: bytes, low: int, high: int, what: str) -> bytes:
    """``data`` behind its varint length; ValueError if its size is not ``low..high``."""
    if not low <= len(data) <= high:
        raise ValueError(f"{what} of {len(data)} bytes (expected {low}..{high})")
    return encode_varint(len(data)) + data


def name(value: str, what: str) -> bytes:
    """A length-prefixed node/service name; ValueError if it is not a valid name."""
    if not is_valid_name(value):
        raise ValueError(f"{what} {value!r} is not a valid name (a DNS label: a-z, 0-9, '-')")
    return blob(value.encode("ascii"), 1, 63, what)


def count(entries: object, high: int, what: str) -> bytes:
    size = len(entries)  # type: ignore[arg-type]
    if size > high:
        raise ValueError(f"{size} {what} (at most {high})")
    return encode_varint(size)
