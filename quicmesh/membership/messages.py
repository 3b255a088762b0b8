"""The membership messages (docs/PROTOCOL.md "Membership"): bodies of FEATURE_MESSAGE and FEATURE_REQUEST
streams with tag MEMBERSHIP, one type byte first.

Announce and Crl are reliable messages; Sync (answered by SyncReply) and Digest (answered by DigestReply)
are requests. Announcements travel as their raw signed bytes: the receiver decodes and verifies each one on
its own (quicmesh.membership.announcement), so one bad announcement never spoils the rest of a batch.

Pure (no cryptography, no I/O): decode_message raises only ProtocolError; encode_message raises ValueError
on values out of bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from quicmesh.membership import codec
from quicmesh.membership.codec import MAX_ANNOUNCEMENT_SIZE, FieldReader, violation
from quicmesh.protocol.wire.common import MAX_VARINT, encode_varint

MAX_ANNOUNCE_BATCH = 64  # announcements in one Announce message
MAX_ENTRIES = 100_000  # (node, version) pairs of a Digest; announcements or wanted names of a DigestReply
MAX_CRL_SIZE = 1 << 20  # a CRL (DER) in a Crl message or a DigestReply
DIGEST_SIZE = 32  # SHA-256
MAX_CRL_NUMBER_BYTES = 20  # RFC 5280: a CRL number is at most 20 octets


class MessageType(IntEnum):
    ANNOUNCE = 1
    SYNC = 2
    SYNC_REPLY = 3
    DIGEST = 4
    DIGEST_REPLY = 5
    CRL = 6


@dataclass(frozen=True)
class Announce:
    """Message: raw signed announcements, passed on unchanged."""

    announcements: tuple[bytes, ...]


@dataclass(frozen=True)
class Sync:
    """Request: the digest of the sender's current members (itself included), its member count, its CRL number."""

    digest: bytes
    members: int
    crl_number: int


@dataclass(frozen=True)
class SyncReply:
    """Response to Sync: whether the digests are equal, and the responder's CRL number."""

    same: bool
    crl_number: int


@dataclass(frozen=True)
class Digest:
    """Request (after a SyncReply with same False): every (node, version) the sender knows, its CRL number."""

    entries: tuple[tuple[str, int], ...]
    crl_number: int


@dataclass(frozen=True)
class DigestReply:
    """Response to Digest: the responder's newer announcements, the nodes it wants announcements of, and its
    CRL (DER) if its CRL number is higher than the requester's (else None)."""

    announcements: tuple[bytes, ...]
    want: tuple[str, ...]
    crl: bytes | None


@dataclass(frozen=True)
class Crl:
    """Message: a CRL (DER), passed on to every member when it is newer than the one a node holds."""

    der: bytes


Message = Announce | Sync | SyncReply | Digest | DigestReply | Crl


def encode_message(message: Message) -> bytes:
    """The message body: its type byte, then its fields."""
    if isinstance(message, Announce):
        return bytes((MessageType.ANNOUNCE,)) + _announcements(message.announcements, MAX_ANNOUNCE_BATCH)
    if isinstance(message, Sync):
        if len(message.digest) != DIGEST_SIZE:
            raise ValueError(f"a Sync digest is {DIGEST_SIZE} bytes, not {len(message.digest)}")
        return b"".join((bytes((MessageType.SYNC,)), message.digest, _varint(message.members, "member count"),
                         _crl_number(message.crl_number)))
    if isinstance(message, SyncReply):
        return bytes((MessageType.SYNC_REPLY, int(bool(message.same)))) + _crl_number(message.crl_number)
    if isinstance(message, Digest):
        parts = [bytes((MessageType.DIGEST,)), _crl_number(message.crl_number),
                 codec.count(message.entries, MAX_ENTRIES, "Digest entries")]
        if len({node for node, _ in message.entries}) != len(message.entries):
            raise ValueError("a Digest lists each node once")
        for node, version in message.entries:
            parts += [codec.name(node, "node"), _varint(version, "version")]
        return b"".join(parts)
    if isinstance(message, DigestReply):
        if len(set(message.want)) != len(message.want):
            raise ValueError("a DigestReply wants each node once")
        parts = [bytes((MessageType.DIGEST_REPLY,)), _announcements(message.announcements, MAX_ENTRIES),
                 codec.count(message.want, MAX_ENTRIES, "wanted nodes")]
        parts += [codec.name(node, "wanted node") for node in message.want]
        parts.append(b"\x00" if message.crl is None else b"\x01" + codec.blob(message.crl, 1, MAX_CRL_SIZE, "CRL"))
        return b"".join(parts)
    if isinstance(message, Crl):
        if not 0 < len(message.der) <= MAX_CRL_SIZE:
            raise ValueError(f"a CRL of {len(message.der)} bytes (expected 1..{MAX_CRL_SIZE})")
        return bytes((MessageType.CRL,)) + message.der
    raise ValueError(f"not a membership message: {type(message).__name__}")


def decode_message(data: bytes) -> Message:
    """Parse a membership message body; ProtocolError (only) on anything malformed or out of bounds."""
    reader = FieldReader(bytes(data), "membership message")
    kind = reader.byte()
    if kind == MessageType.ANNOUNCE:
        message: Message = Announce(_read_announcements(reader, MAX_ANNOUNCE_BATCH))
    elif kind == MessageType.SYNC:
        if reader.remaining() < DIGEST_SIZE:
            raise violation("truncated Sync digest")
        reader.pos += DIGEST_SIZE
        message = Sync(reader.buf[1 : 1 + DIGEST_SIZE], reader.varint(), _read_crl_number(reader))
    elif kind == MessageType.SYNC_REPLY:
        same = reader.byte()
        if same > 1:
            raise violation(f"SyncReply same flag {same} (expected 0 or 1)")
        message = SyncReply(bool(same), _read_crl_number(reader))
    elif kind == MessageType.DIGEST:
        crl_number = _read_crl_number(reader)
        entries = tuple((reader.name("node"), reader.varint())
                        for _ in range(reader.count(MAX_ENTRIES, 3, "Digest entries")))
        if len({node for node, _ in entries}) != len(entries):
            raise violation("Digest lists a node twice")
        message = Digest(entries, crl_number)
    elif kind == MessageType.DIGEST_REPLY:
        announcements = _read_announcements(reader, MAX_ENTRIES)
        want = tuple(reader.name("wanted node") for _ in range(reader.count(MAX_ENTRIES, 2, "wanted nodes")))
        if len(set(want)) != len(want):
            raise violation("DigestReply wants a node twice")
        has_crl = reader.byte()
        if has_crl > 1:
            raise violation(f"DigestReply CRL flag {has_crl} (expected 0 or 1)")
        message = DigestReply(announcements, want, reader.blob(1, MAX_CRL_SIZE, "CRL") if has_crl else None)
    elif kind == MessageType.CRL:
        der = reader.rest()
        if not 0 < len(der) <= MAX_CRL_SIZE:
            raise violation(f"Crl of {len(der)} bytes (expected 1..{MAX_CRL_SIZE})")
        message = Crl(der)
    else:
        raise violation(f"unknown membership message type {kind}")
    reader.end()
    return message


def _varint(value: int, what: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= MAX_VARINT:
        raise ValueError(f"{what} {value!r} is out of range (0..2^62-1)")
    return encode_varint(value)


def _announcements(announcements: tuple[bytes, ...], most: int) -> bytes:
    parts = [codec.count(announcements, most, "announcements")]
    parts += [codec.blob(raw, 1, MAX_ANNOUNCEMENT_SIZE, "announcement") for raw in announcements]
    return b"".join(parts)


def _read_announcements(reader: FieldReader, most: int) -> tuple[bytes, ...]:
    return tuple(reader.blob(1, MAX_ANNOUNCEMENT_SIZE, "announcement")
                 for _ in range(reader.count(most, 2, "announcements")))


def _crl_number(number: int) -> bytes:
    """A CRL number as its length (0..20) and big-endian bytes: RFC 5280 allows 20 octets, over a varint."""
    if not isinstance(number, int) or number < 0 or number.bit_length() > 8 * MAX_CRL_NUMBER_BYTES:
        raise ValueError(f"CRL number {number!r} is out of range (0..2^160-1)")
    return codec.blob(number.to_bytes((number.bit_length() + 7) // 8, "big"), 0, MAX_CRL_NUMBER_BYTES, "CRL number")


def _read_crl_number(reader: FieldReader) -> int:
    return int.from_bytes(reader.blob(0, MAX_CRL_NUMBER_BYTES, "CRL number"), "big")


__all__ = [
    "DIGEST_SIZE",
    "MAX_ANNOUNCE_BATCH",
    "MAX_CRL_SIZE",
    "MAX_ENTRIES",
    "Announce",
    "Crl",
    "Digest",
    "DigestReply",
    "Message",
    "MessageType",
    "Sync",
    "SyncReply",
    "decode_message",
    "encode_message",
]
