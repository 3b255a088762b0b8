"""Wire format: exact bytes, round trips through arbitrary chunking, and hostile input.

The fuzz tests hold the module's promise that any bytes from a peer raise only ProtocolError.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire import (
    MAX_ACK_IDS,
    MAX_CONTROL_FRAME_PAYLOAD,
    MAX_REASON_BYTES,
    MAX_SERVICE_ID,
    MAX_SERVICES,
    MAX_VARINT,
    Ack,
    ControlDecoder,
    FEATURES,
    DatagramKind,
    ErrorCode,
    Feature,
    GoAway,
    Hello,
    Services,
    MessageDecoder,
    Reject,
    RequestDecoder,
    ResponseDecoder,
    ResponseStatus,
    StreamType,
    app_batch_entry,
    batch_entry,
    decode_datagram,
    decode_datagram_batch,
    decode_varint,
    encode_app_datagram,
    encode_datagram_batch,
    encode_forward_datagram,
    encode_forward_reply_datagram,
    encode_frame,
    encode_message,
    encode_request,
    encode_response,
    encode_stream_type,
    encode_varint,
    read_stream_type,
    unbatch_entry,
)

FAST = settings(max_examples=150, deadline=None)

varints = st.integers(0, MAX_VARINT)
small_bodies = st.binary(max_size=300)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given positions (clamped and sorted); may contain empty chunks."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


cut_lists = st.lists(st.integers(0, 400), max_size=8)


def feed_all(decoder, chunks: list[bytes]):
    """Feed like the transport does: FIN with the last chunk; only the last feed may complete."""
    result = None
    for i, chunk in enumerate(chunks):
        result = decoder.feed(chunk, i == len(chunks) - 1)
        assert result is None or i == len(chunks) - 1
    return result


# --- varints ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x40"),
        (16383, b"\x7f\xff"),
        (16384, b"\x80\x00\x40\x00"),
        (2**30 - 1, b"\xbf\xff\xff\xff"),
        (2**30, b"\xc0\x00\x00\x00\x40\x00\x00\x00"),
        (MAX_VARINT, b"\xff" * 8),
        (151288809941952652, bytes.fromhex("c2197c5eff14e88c")),  # RFC 9000 A.1 examples
        (494878333, bytes.fromhex("9d7f3e7d")),
        (15293, bytes.fromhex("7bbd")),
        (37, b"\x25"),
    ],
)
def test_varint_known_encodings(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert decode_varint(encoded) == (value, len(encoded))
    for cut in range(len(encoded)):
        assert decode_varint(encoded[:cut]) is None


def test_varint_accepts_non_shortest_encoding() -> None:
    assert decode_varint(b"\x40\x25") == (37, 2)  # RFC 9000 A.1


@pytest.mark.parametrize("value", [-1, MAX_VARINT + 1])
def test_varint_out_of_range_is_a_local_bug(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@FAST
@given(varints, st.binary(max_size=4))
def test_varint_round_trip(value: int, tail: bytes) -> None:
    encoded = encode_varint(value)
    assert decode_varint(b"xy" + encoded + tail, 2) == (value, 2 + len(encoded))


# --- datagrams --------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=1500))
def test_app_datagram_round_trip(payload: bytes) -> None:
    data = encode_app_datagram(payload)
    assert data[0] == DatagramKind.APP and len(data) == len(payload) + 1
    assert decode_datagram(data) == (DatagramKind.APP, payload)


@FAST
@given(varints, varints, st.binary(max_size=1500))
def test_forward_datagram_round_trip(service_id: int, flow_id: int, payload: bytes) -> None:
    data = encode_forward_datagram(service_id, flow_id, payload)
    assert decode_datagram(data) == (DatagramKind.FORWARD, service_id, flow_id, payload)


@FAST
@given(varints, varints, st.binary(max_size=1500))
def test_forward_reply_datagram_round_trip(service_id: int, flow_id: int, payload: bytes) -> None:
    data = encode_forward_reply_datagram(service_id, flow_id, payload)
    assert data[0] == DatagramKind.FORWARD_REPLY == 0x02
    assert decode_datagram(data) == (DatagramKind.FORWARD_REPLY, service_id, flow_id, payload)


def test_forward_datagram_layout() -> None:
    assert encode_forward_datagram(3, 300, b"hi") == b"\x01\x03\x41\x2chi"
    assert encode_forward_reply_datagram(3, 300, b"") == b"\x02\x03\x41\x2c"
    # ids below 2**14 take at most 2 bytes each: the FORWARD header is at most 4 bytes after the kind
    assert len(encode_forward_datagram(MAX_SERVICE_ID, MAX_SERVICE_ID, b"")) == 5


@pytest.mark.parametrize("data", [b"", b"\x03", b"\xff\x00", b"\x01", b"\x01\x05", b"\x01\x40", b"\x02\x05"])
def test_bad_datagrams(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_datagram(data)
    assert info.value.code == ErrorCode.PROTOCOL_VIOLATION


@FAST
@given(st.binary(max_size=40))
def test_decode_datagram_fuzz(data: bytes) -> None:
    try:
        decode_datagram(data)
    except ProtocolError:
        pass


datagrams = st.one_of(
    st.binary(max_size=20000).map(encode_app_datagram),
    st.builds(encode_forward_datagram, st.integers(0, MAX_SERVICE_ID), st.integers(0, 0x3FFF), small_bodies),
    st.builds(encode_forward_reply_datagram, st.integers(0, MAX_SERVICE_ID), st.integers(0, 0x3FFF), small_bodies),
)


@FAST
@given(st.lists(datagrams, min_size=1, max_size=12))
def test_datagram_batch_round_trip(items: list[bytes]) -> None:
    entries = [batch_entry(item) for item in items]
    assert [unbatch_entry(entry) for entry in entries] == items
    batch = encode_datagram_batch(entries)
    assert batch[0] == DatagramKind.BATCH
    assert len(batch) == 1 + sum(map(len, entries))  # what the sender's budget counts
    assert decode_datagram_batch(batch) == items


@FAST
@given(st.binary(max_size=20000))
def test_app_batch_entry_is_a_batch_entry_of_an_app_datagram(payload: bytes) -> None:
    assert app_batch_entry(payload) == batch_entry(encode_app_datagram(payload))


def test_datagram_batch_layout() -> None:
    assert encode_datagram_batch([app_batch_entry(b"ab"), batch_entry(encode_forward_datagram(1, 2, b""))]) == (
        b"\x03\x03\x00ab\x03\x01\x01\x02"
    )
    assert app_batch_entry(b"x" * 63)[:3] == b"\x40\x40\x00"  # 64 bytes with the kind byte: a 2-byte length


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not a batch"),
        (b"\x00ab", "not a batch"),
        (b"\x03", "empty batch"),
        (b"\x03\x00", "bad batch entry of 0 bytes"),
        (b"\x03\x05ab", "bad batch entry of 5 bytes"),
        (b"\x03\x02\x00a\x40", "truncated batch"),
        (b"\x03\x02\x03\x00", "batch datagram inside a batch"),
    ],
)
def test_bad_datagram_batches(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_datagram_batch(data)
    assert info.value.code == ErrorCode.PROTOCOL_VIOLATION


@FAST
@given(st.binary(max_size=60))
def test_decode_datagram_batch_fuzz(data: bytes) -> None:
    try:
        decode_datagram_batch(b"\x03" + data)
    except ProtocolError:
        pass


# --- stream type ------------------------------------------------------------------------------
def test_read_stream_type() -> None:
    assert read_stream_type(b"") is None
    assert read_stream_type(b"\x01rest") == (StreamType.MESSAGE, 1)
    assert read_stream_type(b"\x40") is None  # half of a two-byte varint: the transport buffers
    assert read_stream_type(b"\x40\x02") == (StreamType.REQUEST, 2)
    for stream_type in StreamType:
        assert read_stream_type(encode_stream_type(stream_type)) == (stream_type, 1)


@pytest.mark.parametrize("data", [b"\x05", b"\x3f", b"\x40\x40", b"\xff" * 8])
def test_unknown_stream_type(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown stream type"):
        read_stream_type(data)


def test_stream_type_direction() -> None:
    assert read_stream_type(b"\x02", bidirectional=True) == (StreamType.REQUEST, 1)
    assert read_stream_type(b"\x00", bidirectional=False) == (StreamType.CONTROL, 1)
    with pytest.raises(ProtocolError, match="REQUEST stream opened as unidirectional"):
        read_stream_type(b"\x02", bidirectional=False)
    with pytest.raises(ProtocolError, match="MESSAGE stream opened as bidirectional"):
        read_stream_type(b"\x01", bidirectional=True)


@FAST
@given(st.binary(max_size=10))
def test_read_stream_type_fuzz(data: bytes) -> None:
    try:
        read_stream_type(data)
    except ProtocolError:
        pass


# --- message / request / response streams -----------------------------------------------------
def test_message_layout() -> None:
    assert encode_message(5, b"hi") == b"\x01\x05\x02hi"
    assert encode_request(b"hi") == b"\x02\x02hi"
    assert encode_response(ResponseStatus.NO_HANDLER, b"") == b"\x02\x00"


def split_stream_type(stream: bytes, expected: StreamType) -> bytes:
    """What the transport does: read the type from the head, hand the rest to a decoder."""
    parsed = read_stream_type(stream)
    assert parsed is not None and parsed[0] == expected
    return stream[parsed[1] :]


@FAST
@given(varints, small_bodies, cut_lists)
def test_message_round_trip(message_id: int, body: bytes, cuts: list[int]) -> None:
    rest = split_stream_type(encode_message(message_id, body), StreamType.MESSAGE)
    decoder = MessageDecoder(max_body=len(body))
    assert feed_all(decoder, chunked(rest, cuts)) == (message_id, body)
    assert decoder.message_id == message_id


@FAST
@given(small_bodies, cut_lists)
def test_request_round_trip(body: bytes, cuts: list[int]) -> None:
    rest = split_stream_type(encode_request(body), StreamType.REQUEST)
    assert feed_all(RequestDecoder(max_body=1000), chunked(rest, cuts)) == body


@FAST
@given(st.sampled_from(ResponseStatus), small_bodies, cut_lists)
def test_response_round_trip(status: ResponseStatus, body: bytes, cuts: list[int]) -> None:
    result = feed_all(ResponseDecoder(max_body=1000), chunked(encode_response(status, body), cuts))
    assert result == (status, body) and isinstance(result[0], ResponseStatus)


def test_fin_may_come_alone_after_the_body() -> None:
    decoder = MessageDecoder(max_body=10)
    assert decoder.feed(b"\x07\x03abc", False) is None
    assert decoder.feed(b"", True) == (7, b"abc")


def test_whole_stream_in_one_chunk_is_sliced_once() -> None:
    data = b"\x07\x03abc"
    body = MessageDecoder(max_body=10).feed(data, True)[1]
    assert body == b"abc" and type(body) is bytes
    # A body-only chunk arriving whole after the header is not copied at all.
    decoder = MessageDecoder(max_body=10)
    decoder.feed(b"\x07\x03", False)
    chunk = b"abc"
    assert decoder.feed(chunk, True)[1] is chunk


def test_message_too_large_is_refused_at_the_header_with_its_id() -> None:
    decoder = MessageDecoder(max_body=4)
    assert decoder.feed(b"\x40", False) is None
    assert decoder.message_id is None
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"\x09\x05", False)  # id 9, length 5: refused before any body byte
    assert info.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert decoder.message_id == 9


@pytest.mark.parametrize("decoder_class", [RequestDecoder, ResponseDecoder])
def test_request_and_response_too_large(decoder_class) -> None:
    with pytest.raises(ProtocolError) as info:
        decoder_class(max_body=4).feed(b"\x00\x05" if decoder_class is ResponseDecoder else b"\x05", False)
    assert info.value.code == ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ([(b"", True)], "ended inside its header"),
        ([(b"\x07", True)], "ended inside its header"),
        ([(b"\x07\x40", True)], "ended inside its header"),
        ([(b"\x07\x03ab", True)], "ended after 2 of 3 body bytes"),
        ([(b"\x07\x03ab", False), (b"", True)], "ended after 2 of 3 body bytes"),
        ([(b"\x07\x03abcd", False)], "1 bytes after the 3-byte message body"),
        ([(b"\x07\x03ab", False), (b"cd", False)], "1 bytes after"),
        ([(b"\x07\x03abc", True), (b"x", False)], "data after the end"),
    ],
)
def test_message_stream_errors(chunks: list[tuple[bytes, bool]], match: str) -> None:
    decoder = MessageDecoder(max_body=10)
    with pytest.raises(ProtocolError, match=match) as info:
        for data, end in chunks:
            decoder.feed(data, end)
    assert info.value.code == ErrorCode.PROTOCOL_VIOLATION


def test_unknown_response_status() -> None:
    with pytest.raises(ProtocolError, match="unknown response status 5"):
        ResponseDecoder(max_body=10).feed(b"\x05\x00", True)


def test_encode_response_rejects_unknown_status() -> None:
    with pytest.raises(ValueError):
        encode_response(9, b"")  # type: ignore[arg-type]


# --- control stream ---------------------------------------------------------------------------
reasons = st.text(max_size=50)
frames = st.one_of(
    st.builds(Ack, st.lists(varints, max_size=20).map(tuple)),
    st.builds(Reject, varints, varints, reasons),
    st.builds(GoAway, varints, reasons),
    st.builds(Services, st.dictionaries(st.integers(0, MAX_SERVICE_ID),
                                        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
                                        max_size=6).map(lambda d: tuple({n: i for i, n in d.items()}.items()))
              .map(lambda pairs: tuple((i, n) for n, i in pairs))),
)
hellos = st.builds(Hello, varints, varints, varints, varints, varints)


def test_control_frame_layout() -> None:
    assert encode_stream_type(StreamType.CONTROL) == b"\x00"
    assert encode_frame(Hello(1, 2, 3, 4)) == b"\x01\x05\x01\x02\x03\x04\x00"
    assert encode_frame(Hello(1, 2, 3, 4, FEATURES)) == b"\x01\x05\x01\x02\x03\x04\x03"
    assert encode_frame(Ack((7, 3, 4, 3))) == b"\x02\x04\x03\x03\x00\x02"  # ids 3, 4, 7 as gaps
    assert encode_frame(Reject(9, ErrorCode.MESSAGE_TOO_LARGE, "big")) == b"\x03\x05\x09\x02big"
    assert encode_frame(GoAway(ErrorCode.SHUTDOWN, "")) == b"\x04\x01\x04"
    assert encode_frame(Services(((7, "dns"), (2, "game")))) == b"\x05\x0c\x02\x02\x04game\x07\x03dns"
    assert encode_frame(Services(())) == b"\x05\x01\x00"


def test_hello_features_are_optional_and_later_fields_ignored() -> None:
    """A Hello from before features means none; fields a later version appends are skipped, not fatal."""
    before_features = b"\x01\x04\x01\x02\x03\x04"
    assert ControlDecoder().feed(before_features) == [Hello(1, 2, 3, 4, 0)]
    later = b"\x01\x08\x01\x02\x03\x04\x41\x01\x07\x09"  # features 0x101, then two unknown fields
    hello = ControlDecoder().feed(later)[0]
    assert hello == Hello(1, 2, 3, 4, 0x101)
    assert hello.features & Feature.DATAGRAM_BATCH


def test_services_frame_limits() -> None:
    biggest = Services(tuple((i, f"{i:03d}" + "x" * 60) for i in range(MAX_SERVICES)))
    assert len(encode_frame(biggest)) < MAX_CONTROL_FRAME_PAYLOAD
    assert ControlDecoder().feed(encode_frame(Hello(1, 0, 0, 0)) + encode_frame(biggest))[1] == biggest
    with pytest.raises(ValueError):
        encode_frame(Services(((MAX_SERVICE_ID + 1, "x"),)))
    with pytest.raises(ValueError):
        encode_frame(Services(((1, ""),)))


def test_ack_normalizes_ids() -> None:
    assert Ack((5, 1, 5)).message_ids == (1, 5)
    assert Ack((5, 1)) == Ack((1, 5))


@FAST
@given(hellos, st.lists(frames, max_size=8), cut_lists)
def test_control_round_trip(hello: Hello, rest: list, cuts: list[int]) -> None:
    stream = encode_stream_type(StreamType.CONTROL) + b"".join(encode_frame(f) for f in [hello, *rest])
    decoder = ControlDecoder()
    out = []
    for chunk in chunked(split_stream_type(stream, StreamType.CONTROL), cuts):
        out.extend(decoder.feed(chunk))
    assert out == [hello, *rest]
    assert decoder.hello == hello


def test_largest_ack_fits_a_frame() -> None:
    ack = Ack(tuple(range(MAX_VARINT - MAX_ACK_IDS + 1, MAX_VARINT + 1)))
    decoder = ControlDecoder()
    assert decoder.feed(encode_frame(Hello(1, 0, 0, 0)) + encode_frame(ack))[1] == ack
    worst = Ack(tuple(i * 2**55 for i in range(MAX_ACK_IDS)))  # every gap takes 8 bytes
    assert len(encode_frame(worst)) < MAX_CONTROL_FRAME_PAYLOAD


def test_oversized_frame_is_a_local_bug() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(Ack(tuple(i * 2**55 for i in range(MAX_CONTROL_FRAME_PAYLOAD // 8 + 1))))


def test_long_reason_is_truncated_at_a_character_boundary() -> None:
    frame = GoAway(ErrorCode.INTERNAL, "é" * MAX_REASON_BYTES)
    decoded = ControlDecoder().feed(encode_frame(Hello(1, 0, 0, 0)) + encode_frame(frame))[1]
    assert decoded == GoAway(ErrorCode.INTERNAL, "é" * (MAX_REASON_BYTES // 2))


def test_bad_utf8_reason_is_replaced_not_fatal() -> None:
    frames = ControlDecoder().feed(encode_frame(Hello(1, 0, 0, 0)) + b"\x04\x03\x04\xff\xfe")
    assert frames[1] == GoAway(ErrorCode.SHUTDOWN, "\ufffd\ufffd")


def test_unknown_frame_types_are_skipped() -> None:
    hello = Hello(1, 2, 3, 4)
    unknown = encode_varint(0x1F) + b"\x03xyz" + encode_varint(0x4000) + b"\x00"
    stream = encode_frame(hello) + unknown + encode_frame(GoAway(0, "bye"))
    assert ControlDecoder().feed(stream) == [hello, GoAway(0, "bye")]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode_frame(Ack((1,))), "0x2 before Hello"),
        (b"\x1f\x00", "0x1f before Hello"),  # even an unknown frame may not come first
        (encode_frame(Hello(1, 0, 0, 0)) * 2, "second Hello"),
        (b"\x01\x03\x01\x02\x03", "truncated Hello"),
        (b"\x01\x04\x01\x02\x03\x40", "truncated Hello"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x02\x02\x05\x00", "Ack claims 5 ids in 1 bytes"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x02\x03\x01\x00\x00", "trailing bytes in Ack"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x02\x11\x02" + b"\xff" * 16, "Ack message id out of range"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x03\x01\x40", "truncated Reject"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x04\x00", "truncated GoAway"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x04\x01\x01\x03ab", "truncated Services"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x02\x05\x00", "Services claims 5 entries"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x04\x01\x01\x00a", "bad Services entry"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x06\x01\x80\x00\x40\x00\x01", "bad Services entry"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x04\x01\x01\x01\xff", "not UTF-8"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x07\x02\x01\x01a\x01\x01b", "duplicate Services entry"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x07\x02\x01\x01a\x02\x01a", "duplicate Services entry"),
        (encode_frame(Hello(1, 0, 0, 0)) + b"\x05\x05\x01\x01\x01ab", "trailing bytes in Services"),
    ],
)
def test_control_frame_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        ControlDecoder().feed(data)
    assert info.value.code == ErrorCode.PROTOCOL_VIOLATION


def test_control_frame_too_large_is_refused_before_buffering() -> None:
    decoder = ControlDecoder()
    decoder.feed(encode_frame(Hello(1, 0, 0, 0)))
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(encode_varint(0x1F) + encode_varint(MAX_CONTROL_FRAME_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="exceeds 10"):
        ControlDecoder(max_payload=10).feed(encode_frame(Hello(1, 0, 0, 0)) + b"\x1f\x0b")


def test_control_decoder_buffers_partial_frames() -> None:
    data = encode_frame(Hello(1, 7, 100, 1000))
    decoder = ControlDecoder()
    for byte in data[:-1]:
        assert decoder.feed(bytes([byte])) == []
    assert decoder.hello is None
    assert decoder.feed(data[-1:]) == [Hello(1, 7, 100, 1000)]


# --- hostile input: only ProtocolError, whatever the bytes and chunking -----------------------
def hostile(prefix: bytes = b""):
    """Random bytes, sometimes after a valid prefix so the decoder gets past its header."""
    return st.tuples(st.sampled_from([b"", prefix]), st.binary(max_size=60)).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(hostile(b"\x07\x05"), cut_lists, st.booleans(), st.integers(0, 10))
def test_message_decoder_fuzz(data: bytes, cuts: list[int], fin: bool, max_body: int) -> None:
    decoder = MessageDecoder(max_body)
    try:
        for i, chunk in enumerate(chunks := chunked(data, cuts)):
            decoder.feed(chunk, fin and i == len(chunks) - 1)
    except ProtocolError as error:
        assert error.code in (ErrorCode.PROTOCOL_VIOLATION, ErrorCode.MESSAGE_TOO_LARGE)


@settings(max_examples=300, deadline=None)
@given(hostile(b"\x05"), cut_lists, st.booleans(), st.integers(0, 10))
def test_request_decoder_fuzz(data: bytes, cuts: list[int], fin: bool, max_body: int) -> None:
    decoder = RequestDecoder(max_body)
    try:
        for i, chunk in enumerate(chunks := chunked(data, cuts)):
            decoder.feed(chunk, fin and i == len(chunks) - 1)
    except ProtocolError as error:
        assert error.code in (ErrorCode.PROTOCOL_VIOLATION, ErrorCode.MESSAGE_TOO_LARGE)


@settings(max_examples=300, deadline=None)
@given(hostile(b"\x00\x05"), cut_lists, st.booleans(), st.integers(0, 10))
def test_response_decoder_fuzz(data: bytes, cuts: list[int], fin: bool, max_body: int) -> None:
    decoder = ResponseDecoder(max_body)
    try:
        for i, chunk in enumerate(chunks := chunked(data, cuts)):
            decoder.feed(chunk, fin and i == len(chunks) - 1)
    except ProtocolError as error:
        assert error.code in (ErrorCode.PROTOCOL_VIOLATION, ErrorCode.MESSAGE_TOO_LARGE)


@settings(max_examples=300, deadline=None)
@given(hostile(encode_frame(Hello(1, 2, 3, 4))), cut_lists)
def test_control_decoder_fuzz(data: bytes, cuts: list[int]) -> None:
    decoder = ControlDecoder()
    try:
        for chunk in chunked(data, cuts):
            for frame in decoder.feed(chunk):
                assert isinstance(frame, (Hello, Ack, Reject, GoAway, Services))
    except ProtocolError as error:
        assert error.code == ErrorCode.PROTOCOL_VIOLATION


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.binary(max_size=20)), max_size=6), cut_lists)
def test_control_decoder_fuzz_with_frame_shaped_input(bodies: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """Random payloads inside well-formed frame headers reach every frame parser."""
    stream = encode_frame(Hello(1, 2, 3, 4)) + b"".join(
        encode_varint(frame_type) + encode_varint(len(payload)) + payload for frame_type, payload in bodies
    )
    decoder = ControlDecoder()
    try:
        for chunk in chunked(stream, cuts):
            decoder.feed(chunk)
    except ProtocolError as error:
        assert error.code == ErrorCode.PROTOCOL_VIOLATION
