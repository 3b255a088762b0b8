"""The NAT feature's requests (docs/PROTOCOL.md, "NAT traversal"): pure, no I/O.

The body of a FEATURE_REQUEST tagged NAT is ``op (varint)`` then the op's fields; responses carry an address
or nothing. An address is ``version (1 byte: 4 or 6), IP (4 or 16 bytes), port (2 bytes, big endian)``; a
node name is its ASCII bytes (a DNS label), last in the body.

- OBSERVE (no fields): "where do you see me?" The answer is the address the asked peer receives the asker's
  packets from (its public mapping when a NAT is in between).
- PUNCH (target name): asked of a rendezvous (a peer connected directly to both): "get ``target`` and me to dial
  each other". The rendezvous sends OFFER to the target and answers with the target's address as it sees it.
- OFFER (source address, source name): the rendezvous to the target: ``source`` is at that address and dials
  you now; dial it too. An empty answer means yes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum

from quicmesh.errors import ProtocolError
from quicmesh.protocol import wire

_SIZES = {4: 4, 6: 16}


class NatOp(IntEnum):
    OBSERVE = 1
    PUNCH = 2
    OFFER = 3


@dataclass(frozen=True)
class Observe:
    pass


@dataclass(frozen=True)
class Punch:
    target: str


@dataclass(frozen=True)
class Offer:
    source: str
    address: tuple[str, int]


NatRequest = Observe | Punch | Offer


def encode_request(request: NatRequest) -> bytes:
    if isinstance(request, Observe):
        return wire.encode_varint(NatOp.OBSERVE)
    if isinstance(request, Punch):
        return wire.encode_varint(NatOp.PUNCH) + wire.encode_node_name(request.target)
    return wire.encode_varint(NatOp.OFFER) + encode_address(request.address) + wire.encode_node_name(request.source)


def decode_request(data: bytes) -> NatRequest:
    """Parse a NAT request; ProtocolError on any malformed input."""
    op, pos = _op(data)
    if op == NatOp.OBSERVE:
        if pos != len(data):
            raise _error("trailing bytes in an OBSERVE request")
        return Observe()
    if op == NatOp.PUNCH:
        return Punch(wire.decode_node_name(data[pos:], "NAT request"))
    if op == NatOp.OFFER:
        address, pos = _read_address(data, pos)
        return Offer(wire.decode_node_name(data[pos:], "NAT request"), address)
    raise _error(f"unknown NAT op {op}")


def encode_address(address: tuple[str, int]) -> bytes:
    """ValueError unless ``address`` is (IP literal, port 1..65535); an IPv4-mapped IPv6 address is sent as IPv4."""
    host, port = address
    ip = unmapped(ipaddress.ip_address(host))
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port!r}")
    return bytes((ip.version,)) + ip.packed + port.to_bytes(2, "big")


def decode_address(data: bytes) -> tuple[str, int]:
    """A whole body that is one address (the answer to OBSERVE and PUNCH); ProtocolError if it is not."""
    address, pos = _read_address(data, 0)
    if pos != len(data):
        raise _error("trailing bytes after an address")
    return address


def unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``::ffff:a.b.c.d`` (an IPv4 peer on a dual-stack socket) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _read_address(data: bytes, pos: int) -> tuple[tuple[str, int], int]:
    if pos >= len(data) or data[pos] not in _SIZES:
        raise _error("an address must start with its IP version, 4 or 6")
    size = _SIZES[data[pos]]
    end = pos + 1 + size + 2
    if end > len(data):
        raise _error("truncated address")
    raw = bytes(data[pos + 1:pos + 1 + size])
    ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    port = int.from_bytes(data[end - 2:end], "big")
    if port == 0:
        raise _error("an address with port 0")
    return (str(ip), port), end


def _op(data: bytes) -> tuple[int, int]:
    parsed = wire.decode_varint(data, 0)
    if parsed is None:
        raise _error("empty or truncated NAT request")
    return parsed


def _error(reason: str) -> ProtocolError:
    return ProtocolError(reason, code=wire.ErrorCode.PROTOCOL_VIOLATION)
