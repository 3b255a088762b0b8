"""FEATURE_MESSAGE and FEATURE_REQUEST streams (protocol/wire/streams.py): exact bytes, round trips fed in
every split, refusals, and hostile input (any bytes raise only ProtocolError)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire import (
    MAX_VARINT,
    ErrorCode,
    FeatureMessageDecoder,
    FeatureRequestDecoder,
    StreamType,
    encode_feature_message,
    encode_feature_request,
    encode_varint,
    read_stream_type,
)

tags = st.integers(1, MAX_VARINT)
bodies = st.binary(max_size=200)


def after_type(stream: bytes, bidirectional: bool) -> tuple[StreamType, bytes]:
    parsed = read_stream_type(stream, bidirectional=bidirectional)
    assert parsed is not None
    stream_type, used = parsed
    return stream_type, stream[used:]


def test_exact_bytes() -> None:
    assert encode_feature_message(1, 5, b"hi") == b"\x03\x01\x05\x02hi"
    assert encode_feature_request(4, b"q") == b"\x04\x04\x01q"
    assert encode_feature_message(0x40, 0, b"") == b"\x03\x40\x40\x00\x00"  # two-byte varint tag


def test_stream_types_belong_on_their_kind_of_stream() -> None:
    assert read_stream_type(encode_feature_message(1, 0, b""), bidirectional=False) == (StreamType.FEATURE_MESSAGE, 1)
    assert read_stream_type(encode_feature_request(1, b""), bidirectional=True) == (StreamType.FEATURE_REQUEST, 1)
    with pytest.raises(ProtocolError, match="FEATURE_MESSAGE stream opened as bidirectional"):
        read_stream_type(encode_feature_message(1, 0, b""), bidirectional=True)
    with pytest.raises(ProtocolError, match="FEATURE_REQUEST stream opened as unidirectional"):
        read_stream_type(encode_feature_request(1, b""), bidirectional=False)


@settings(max_examples=150, deadline=None)
@given(tag=tags, message_id=st.integers(0, MAX_VARINT), body=bodies)
def test_feature_message_round_trip_fed_in_every_split(tag: int, message_id: int, body: bytes) -> None:
    stream_type, rest = after_type(encode_feature_message(tag, message_id, body), bidirectional=False)
    assert stream_type is StreamType.FEATURE_MESSAGE
    for cut in range(len(rest) + 1):
        decoder = FeatureMessageDecoder(len(body))
        assert decoder.feed(rest[:cut], False) is None
        assert decoder.feed(rest[cut:], True) == (tag, message_id, body)


@settings(max_examples=150, deadline=None)
@given(tag=tags, body=bodies)
def test_feature_request_round_trip_fed_in_every_split(tag: int, body: bytes) -> None:
    stream_type, rest = after_type(encode_feature_request(tag, body), bidirectional=True)
    assert stream_type is StreamType.FEATURE_REQUEST
    for cut in range(len(rest) + 1):
        decoder = FeatureRequestDecoder(len(body))
        assert decoder.feed(rest[:cut], False) is None
        assert decoder.feed(rest[cut:], True) == (tag, body)


def test_byte_by_byte_with_fin_alone() -> None:
    rest = encode_feature_message(3, 9, b"body")[1:]
    decoder = FeatureMessageDecoder(100)
    assert all(decoder.feed(rest[i : i + 1], False) is None for i in range(len(rest)))
    assert decoder.feed(b"", True) == (3, 9, b"body")
    with pytest.raises(ProtocolError, match="data after the end"):
        decoder.feed(b"x", False)


@pytest.mark.parametrize(("decoder", "stream"), [
    (FeatureMessageDecoder, encode_feature_message(0, 1, b"x")),
    (FeatureRequestDecoder, encode_feature_request(0, b"x")),
])
def test_tag_zero_is_refused(decoder: type, stream: bytes) -> None:
    with pytest.raises(ProtocolError, match="with tag 0") as refused:
        decoder(100).feed(stream[1:], True)
    assert refused.value.code == ErrorCode.PROTOCOL_VIOLATION


def test_an_oversized_feature_message_is_refused_with_its_id_known() -> None:
    decoder = FeatureMessageDecoder(10)
    head = encode_feature_message(2, 77, b"x" * 11)[1:-11]  # tag, id, length: the header only
    with pytest.raises(ProtocolError, match="message body of 11 bytes exceeds the limit of 10") as refused:
        decoder.feed(head, False)
    assert refused.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert decoder.message_id == 77  # so the receiver can Reject it by id


def test_an_oversized_feature_request_is_refused() -> None:
    with pytest.raises(ProtocolError, match="request body of 11 bytes exceeds the limit of 10") as refused:
        FeatureRequestDecoder(10).feed(encode_feature_request(2, b"x" * 11)[1:], True)
    assert refused.value.code == ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(("rest", "why"), [
    (encode_varint(1) + encode_varint(2), "ended inside its header"),
    (encode_varint(1) + encode_varint(2) + encode_varint(5) + b"abc", "ended after 3 of 5 body bytes"),
    (encode_varint(1) + encode_varint(2) + encode_varint(1) + b"ab", "1 bytes after the 1-byte message body"),
])
def test_truncated_or_overlong_feature_messages_are_violations(rest: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as refused:
        FeatureMessageDecoder(100).feed(rest, True)
    assert refused.value.code == ErrorCode.PROTOCOL_VIOLATION


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64), cut=st.integers(0, 64), end=st.booleans(), limit=st.integers(0, 32),
       message=st.booleans())
def test_any_bytes_raise_only_protocol_error(data: bytes, cut: int, end: bool, limit: int, message: bool) -> None:
    decoder = FeatureMessageDecoder(limit) if message else FeatureRequestDecoder(limit)
    try:
        decoder.feed(data[:cut], False)
        decoder.feed(data[cut:], end)
    except ProtocolError:
        pass
