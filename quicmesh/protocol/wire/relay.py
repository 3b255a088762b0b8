"""Relay: circuits through a third node (quicmesh/relay; docs/PROTOCOL.md "Relay").

An end node's inner QUIC packets cross the outer connections in RELAY_UP datagrams (end -> relay) and
RELAY_DOWN datagrams (relay -> the other end), each ``kind, circuit id (varint), packet``: the relay forwards the
packet bytes as they are, without reading them (they are the inner connection's encrypted QUIC packets). Two
kinds, not one, so that a node that is at the same time a relay and an end never confuses its own circuit ids
with its relays' ones. Circuits are set up and torn down with relay messages, the body of FEATURE_REQUEST and
FEATURE_MESSAGE streams tagged RELAY: ``op (varint)`` then the op's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire.common import DatagramKind, ErrorCode, _Reader, decode_node_name, encode_node_name, \
    encode_varint

MAX_CIRCUIT_ID = 0x3FFF_FFFF  # a 4-byte varint at most
RELAY_HEADER_MAX = 1 + 4  # kind byte + circuit id
MAX_REACH_ENTRIES = 1024
_RELAY_KINDS = frozenset({int(DatagramKind.RELAY_UP), int(DatagramKind.RELAY_DOWN)})


def encode_relay_datagram(kind: DatagramKind, circuit: int, packet: bytes) -> bytes:
    if int(kind) not in _RELAY_KINDS or not 0 <= circuit <= MAX_CIRCUIT_ID:
        raise ValueError(f"not a relay datagram: kind {kind!r}, circuit {circuit!r}")
    return b"".join((bytes((kind,)), encode_varint(circuit), packet))


def decode_relay_datagram(data: bytes) -> tuple[int, int, bytes]:
    """``(kind, circuit, packet)`` of a RELAY_UP or RELAY_DOWN datagram."""
    if not data or data[0] not in _RELAY_KINDS:
        raise ProtocolError("not a relay datagram", code=ErrorCode.PROTOCOL_VIOLATION)
    reader = _Reader(data, "relay datagram header", 1)
    circuit = reader.varint()
    if circuit > MAX_CIRCUIT_ID:
        raise ProtocolError(f"relay circuit id {circuit} out of range", code=ErrorCode.PROTOCOL_VIOLATION)
    packet = reader.rest()
    if not packet:
        raise ProtocolError("empty relay datagram", code=ErrorCode.PROTOCOL_VIOLATION)
    return data[0], circuit, bytes(packet)


class RelayOp(IntEnum):
    CONNECT = 1  # end -> relay (request): open a circuit to ``target``; the response is the circuit id
    OFFER = 2  # relay -> the other end (request): ``source`` wants a circuit ``circuit``; empty response = yes
    CLOSE_UP = 3  # an end -> the relay (message): this end is done with the relay's circuit
    CLOSE_DOWN = 5  # the relay -> an end (message): the circuit through the relay is gone
    #   (two ops, as RELAY_UP/RELAY_DOWN: a node may hold the same circuit id as a relay and as an end)
    REACH = 4  # a node looking for a relay -> a peer (request, no entries): the answer is a Reach of whom the
    #            peer reaches directly, with the RTT (microseconds)


@dataclass(frozen=True)
class Connect:
    target: str


@dataclass(frozen=True)
class Offer:
    source: str
    circuit: int


@dataclass(frozen=True)
class Close:
    circuit: int
    reason: str
    up: bool  # True: from an end to the relay (CLOSE_UP); False: from the relay to an end (CLOSE_DOWN)


@dataclass(frozen=True)
class Reach:
    peers: tuple[tuple[str, int], ...]  # (node name, RTT in microseconds)


RelayMessage = Connect | Offer | Close | Reach


def encode_relay_message(message: RelayMessage) -> bytes:
    if isinstance(message, Connect):
        return encode_varint(RelayOp.CONNECT) + encode_node_name(message.target)
    if isinstance(message, Offer):
        return b"".join((encode_varint(RelayOp.OFFER), _circuit(message.circuit), encode_node_name(message.source)))
    if isinstance(message, Close):
        op = RelayOp.CLOSE_UP if message.up else RelayOp.CLOSE_DOWN
        return b"".join((encode_varint(op), _circuit(message.circuit), message.reason.encode()[:512]))
    if len(message.peers) > MAX_REACH_ENTRIES:
        raise ValueError(f"Reach of {len(message.peers)} peers (at most {MAX_REACH_ENTRIES})")
    parts = [encode_varint(RelayOp.REACH), encode_varint(len(message.peers))]
    for name, rtt_us in message.peers:
        encoded = encode_node_name(name)
        parts += [encode_varint(len(encoded)), encoded, encode_varint(max(0, rtt_us))]
    return b"".join(parts)


def decode_relay_message(data: bytes) -> RelayMessage:
    reader = _Reader(data, "relay message")
    op = reader.varint()
    if op == RelayOp.CONNECT:
        return Connect(decode_node_name(reader.rest(), "relay message"))
    if op == RelayOp.OFFER:
        circuit = _read_circuit(reader)
        return Offer(decode_node_name(reader.rest(), "relay message"), circuit)
    if op == RelayOp.CLOSE_UP or op == RelayOp.CLOSE_DOWN:
        circuit = _read_circuit(reader)
        return Close(circuit, reader.text(), up=op == RelayOp.CLOSE_UP)
    if op == RelayOp.REACH:
        count = reader.varint()
        if count > MAX_REACH_ENTRIES or count > reader.remaining():
            raise ProtocolError(f"Reach claims {count} peers", code=ErrorCode.PROTOCOL_VIOLATION)
        peers = []
        for _ in range(count):
            size = reader.varint()
            if size > reader.remaining():
                raise ProtocolError("truncated Reach entry", code=ErrorCode.PROTOCOL_VIOLATION)
            start = reader.pos
            reader.pos += size
            peers.append((decode_node_name(reader.buf[start:reader.pos], "relay message"), reader.varint()))
        reader.end()
        return Reach(tuple(peers))
    raise ProtocolError(f"unknown relay op {op}", code=ErrorCode.PROTOCOL_VIOLATION)


def _circuit(circuit: int) -> bytes:
    if not 0 <= circuit <= MAX_CIRCUIT_ID:
        raise ValueError(f"circuit id out of range: {circuit!r}")
    return encode_varint(circuit)


def _read_circuit(reader: _Reader) -> int:
    circuit = reader.varint()
    if circuit > MAX_CIRCUIT_ID:
        raise ProtocolError(f"relay circuit id {circuit} out of range", code=ErrorCode.PROTOCOL_VIOLATION)
    return circuit
