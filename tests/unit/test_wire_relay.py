"""RELAY_UP/RELAY_DOWN datagrams and the relay messages (protocol/wire/relay.py): exact bytes, round trips,
bounds, encoders refusing bad values, and hostile input (any bytes raise only ProtocolError)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire import (
    MAX_CIRCUIT_ID,
    MAX_REACH_ENTRIES,
    MAX_VARINT,
    RELAY_HEADER_MAX,
    DatagramKind,
    ErrorCode,
    decode_relay_datagram,
    decode_relay_message,
    encode_relay_datagram,
    encode_relay_message,
    encode_varint,
)
from quicmesh.protocol.names import NAME_PATTERN
from quicmesh.protocol.wire.relay import Close, Connect, Offer, Reach, RelayOp

FAST = settings(max_examples=200, deadline=None)
RELAY_KINDS = (DatagramKind.RELAY_UP, DatagramKind.RELAY_DOWN)

circuits = st.integers(0, MAX_CIRCUIT_ID)
names = st.from_regex(NAME_PATTERN, fullmatch=True)
packets = st.binary(min_size=1, max_size=1300)
rtts = st.integers(0, MAX_VARINT)
messages = st.one_of(
    st.builds(Connect, names),
    st.builds(Offer, names, circuits),
    st.builds(Close, circuits, st.text(st.characters(max_codepoint=0x7F), max_size=512), st.booleans()),
    st.builds(Reach, st.lists(st.tuples(names, rtts), max_size=20).map(tuple)),
)


# --- exact bytes ------------------------------------------------------------------------------
def test_datagram_exact_bytes() -> None:
    assert encode_relay_datagram(DatagramKind.RELAY_UP, 1, b"pkt") == b"\x05\x01pkt"
    assert encode_relay_datagram(DatagramKind.RELAY_DOWN, 0x40, b"pkt") == b"\x06\x40\x40pkt"
    largest = encode_relay_datagram(DatagramKind.RELAY_UP, MAX_CIRCUIT_ID, b"p")
    assert largest == b"\x05\xbf\xff\xff\xffp" and len(largest) - 1 == RELAY_HEADER_MAX  # the header's bound holds


def test_message_exact_bytes() -> None:
    assert encode_relay_message(Connect("gamma")) == b"\x01gamma"
    assert encode_relay_message(Offer("alpha", 7)) == b"\x02\x07alpha"
    assert encode_relay_message(Close(3, "bye", up=True)) == b"\x03\x03bye"
    assert encode_relay_message(Close(3, "bye", up=False)) == b"\x05\x03bye"
    assert encode_relay_message(Reach(())) == b"\x04\x00"
    assert encode_relay_message(Reach((("beta", 1500), ("c", 0)))) == b"\x04\x02\x04beta\x45\xdc\x01c\x00"
    assert sorted(int(op) for op in RelayOp) == [1, 2, 3, 4, 5]


# --- round trips ------------------------------------------------------------------------------
@FAST
@given(kind=st.sampled_from(RELAY_KINDS), circuit=circuits, packet=packets)
def test_datagram_round_trip(kind: DatagramKind, circuit: int, packet: bytes) -> None:
    encoded = encode_relay_datagram(kind, circuit, packet)
    assert len(encoded) <= RELAY_HEADER_MAX + len(packet)
    assert decode_relay_datagram(encoded) == (int(kind), circuit, packet)


@FAST
@given(message=messages)
def test_message_round_trip(message: Connect | Offer | Close | Reach) -> None:
    assert decode_relay_message(encode_relay_message(message)) == message


def test_reach_of_the_most_entries_round_trips() -> None:
    peers = tuple((f"node-{i}", i * 1000) for i in range(MAX_REACH_ENTRIES))
    assert decode_relay_message(encode_relay_message(Reach(peers))) == Reach(peers)


def test_close_reason_is_bounded_and_bad_utf8_is_no_error() -> None:
    encoded = encode_relay_message(Close(1, "x" * 5000, up=True))
    assert len(encoded) == 2 + 512
    assert decode_relay_message(encoded) == Close(1, "x" * 512, up=True)
    cut_in_a_character = encode_relay_message(Close(1, "é" * 300, up=True))  # 600 bytes: cut to 512 inside no char
    assert decode_relay_message(cut_in_a_character).reason.startswith("é" * 256)
    assert decode_relay_message(b"\x03\x01\xff\xfe") == Close(1, "\ufffd\ufffd", up=True)  # a diagnostic, not worth an error


def test_non_shortest_varints_are_accepted() -> None:
    assert decode_relay_datagram(b"\x05\x40\x07pkt") == (5, 7, b"pkt")  # RFC 9000 allows them
    assert decode_relay_message(b"\x40\x01gamma") == Connect("gamma")


def test_negative_rtt_is_sent_as_zero() -> None:
    assert decode_relay_message(encode_relay_message(Reach((("beta", -5),)))) == Reach((("beta", 0),))


# --- malformed input: ProtocolError, naming the problem ------------------------------------------
@pytest.mark.parametrize(("data", "problem"), [
    (b"", "not a relay datagram"),
    (b"\x00\x01pkt", "not a relay datagram"),  # APP
    (b"\x04\x01pkt", "not a relay datagram"),  # PUBLISH
    (b"\x07\x01pkt", "not a relay datagram"),
    (b"\x05", "truncated relay datagram header"),
    (b"\x05\x40", "truncated relay datagram header"),
    (b"\x06\xbf\xff\xff", "truncated relay datagram header"),
    (b"\x05\x01", "empty relay datagram"),
    (b"\x05" + encode_varint(MAX_CIRCUIT_ID + 1) + b"p", f"circuit id {MAX_CIRCUIT_ID + 1} out of range"),
    (b"\x06" + encode_varint(MAX_VARINT) + b"p", "out of range"),
])
def test_malformed_datagrams(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem) as raised:
        decode_relay_datagram(data)
    assert raised.value.code == ErrorCode.PROTOCOL_VIOLATION


LONGEST_NAME = b"a" * 63


@pytest.mark.parametrize(("data", "problem"), [
    (b"", "truncated relay message"),
    (b"\x40", "truncated relay message"),
    (b"\x00gamma", "unknown relay op 0"),
    (b"\x06gamma", "unknown relay op 6"),
    (encode_varint(MAX_VARINT) + b"x", "unknown relay op"),
    (b"\x01", "names no valid node"),  # Connect to nobody
    (b"\x01Gamma", "names no valid node"),
    (b"\x01-gamma", "names no valid node"),
    (b"\x01gam ma", "names no valid node"),
    (b"\x01" + LONGEST_NAME + b"a", "names no valid node"),
    (b"\x01gamm\xc3\xa9", "names no valid node"),
    (b"\x01gamma\x00", "names no valid node"),
    (b"\x02", "truncated relay message"),  # Offer without a circuit
    (b"\x02\x07", "names no valid node"),
    (b"\x02" + encode_varint(MAX_CIRCUIT_ID + 1) + b"alpha", "out of range"),
    (b"\x03", "truncated relay message"),
    (b"\x03" + encode_varint(MAX_CIRCUIT_ID + 1), "out of range"),
    (b"\x04", "truncated relay message"),
    (b"\x04" + encode_varint(MAX_REACH_ENTRIES + 1) + b"\x00" * 4000, f"Reach claims {MAX_REACH_ENTRIES + 1}"),
    (b"\x04\x05\x01a\x00", "Reach claims 5"),  # more entries than bytes left
    (b"\x04\x03\x01a\x00", "truncated relay message"),  # the second entry is missing
    (b"\x04\x01\x06beta\x00", "truncated Reach entry"),
    (b"\x04\x01\x04beta", "truncated relay message"),  # no RTT
    (b"\x04\x01\x04beta\x40", "truncated relay message"),
    (b"\x04\x01\x04BETA\x00", "names no valid node"),
    (b"\x04\x01\x00\x00", "names no valid node"),
    (b"\x04\x01\x04beta\x00x", "1 trailing bytes in relay message"),
    (b"\x04\x00\x00", "1 trailing bytes"),
])
def test_malformed_messages(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem) as raised:
        decode_relay_message(data)
    assert raised.value.code == ErrorCode.PROTOCOL_VIOLATION


def test_longest_name_is_accepted() -> None:
    assert decode_relay_message(b"\x01" + LONGEST_NAME) == Connect("a" * 63)


# --- encoders refuse what the decoders would refuse ---------------------------------------------
@pytest.mark.parametrize(("kind", "circuit"), [
    (DatagramKind.APP, 1), (DatagramKind.PUBLISH, 1), (DatagramKind.RELAY_UP, -1),
    (DatagramKind.RELAY_DOWN, MAX_CIRCUIT_ID + 1),
])
def test_datagram_encoder_refuses_bad_values(kind: DatagramKind, circuit: int) -> None:
    with pytest.raises(ValueError, match="not a relay datagram"):
        encode_relay_datagram(kind, circuit, b"pkt")


@pytest.mark.parametrize("message", [
    Connect("Gamma"), Connect(""), Connect("a" * 64), Connect("gamma.example"),
    Offer("alpha", -1), Offer("alpha", MAX_CIRCUIT_ID + 1), Offer("al pha", 1),
    Close(-1, "x", up=True), Close(MAX_CIRCUIT_ID + 1, "x", up=False),
    Reach((("beta", 1),) * (MAX_REACH_ENTRIES + 1)), Reach((("BETA", 1),)), Reach((("beta", MAX_VARINT + 1),)),
])
def test_message_encoder_refuses_bad_values(message: Connect | Offer | Close | Reach) -> None:
    with pytest.raises(ValueError):
        encode_relay_message(message)


# --- hostile input ------------------------------------------------------------------------------
def decodes_or_protocol_error(decoder, data: bytes) -> None:  # noqa: ANN001
    try:
        decoder(data)
    except ProtocolError as error:
        assert error.code == ErrorCode.PROTOCOL_VIOLATION


@settings(max_examples=600, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_raise_only_protocol_error(data: bytes) -> None:
    decodes_or_protocol_error(decode_relay_message, data)
    decodes_or_protocol_error(decode_relay_datagram, data)
    for kind in RELAY_KINDS:  # past the kind check, into the header
        decodes_or_protocol_error(decode_relay_datagram, bytes((kind,)) + data)


@st.composite
def mutated(draw: st.DrawFn, encoded: bytes) -> bytes:
    """``encoded`` with a few bytes flipped, cut, inserted or removed."""
    data = bytearray(encoded)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if how == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(data):
            del data[at]
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), message=messages)
def test_mutated_messages_raise_only_protocol_error(data: st.DataObject, message) -> None:  # noqa: ANN001
    decodes_or_protocol_error(decode_relay_message, data.draw(mutated(encode_relay_message(message))))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), kind=st.sampled_from(RELAY_KINDS), circuit=circuits, packet=st.binary(min_size=1, max_size=40))
def test_mutated_datagrams_raise_only_protocol_error(data: st.DataObject, kind: DatagramKind, circuit: int,
                                                     packet: bytes) -> None:
    decodes_or_protocol_error(decode_relay_datagram, data.draw(mutated(encode_relay_datagram(kind, circuit, packet))))
