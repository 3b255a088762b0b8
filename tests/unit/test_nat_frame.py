"""The NAT feature's requests and addresses (quicmesh/nat/frame.py): round trips, any bytes raise only
ProtocolError; and what observed addresses say about a NAT."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.errors import ProtocolError
from quicmesh.nat.feature import mapping
from quicmesh.nat.frame import (
    NatOp,
    Observe,
    Offer,
    Punch,
    decode_address,
    decode_request,
    encode_address,
    encode_request,
)
from quicmesh.protocol import wire

ADDRESSES = [("203.0.113.7", 4433), ("2001:db8::7", 1), ("10.0.0.1", 65535)]


@pytest.mark.parametrize("request_", [Observe(), Punch("beta"), *(Offer("alpha-1", a) for a in ADDRESSES)])
def test_requests_round_trip(request_: object) -> None:
    assert decode_request(encode_request(request_)) == request_  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ADDRESSES)
def test_addresses_round_trip_and_are_seven_or_nineteen_bytes(address: tuple[str, int]) -> None:
    encoded = encode_address(address)
    assert len(encoded) == (7 if "." in address[0] else 19)
    assert decode_address(encoded) == address


def test_an_ipv4_peer_seen_on_a_dual_stack_socket_is_sent_as_ipv4() -> None:
    assert decode_address(encode_address(("::ffff:198.51.100.2", 9))) == ("198.51.100.2", 9)


@pytest.mark.parametrize("bad", [("10.0.0.1", 0), ("10.0.0.1", 65536), ("not-an-ip", 1)])
def test_encoding_refuses_what_is_no_address(bad: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        encode_address(bad)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (bytes([NatOp.OBSERVE, 0]), "trailing"),
    (bytes([NatOp.PUNCH]) + b"Not_A_Name", "no valid node"),
    (bytes([NatOp.PUNCH]) + "bêta".encode(), "no valid node"),
    (bytes([NatOp.OFFER, 5]) + bytes(6) + b"a", "IP version"),
    (bytes([NatOp.OFFER, 4, 10, 0, 0]), "truncated"),
    (bytes([NatOp.OFFER, 4, 10, 0, 0, 1, 0, 0]) + b"alpha", "port 0"),
    (bytes([9]), "unknown NAT op 9"),
])
def test_malformed_requests_are_protocol_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as raised:
        decode_request(data)
    assert raised.value.code == wire.ErrorCode.PROTOCOL_VIOLATION


def test_an_address_answer_with_trailing_bytes_is_refused() -> None:
    with pytest.raises(ProtocolError, match="trailing"):
        decode_address(encode_address(("10.0.0.1", 1)) + b"x")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for decode in (decode_request, decode_address):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(ip=st.ip_addresses(), port=st.integers(1, 65535), name=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
                                                                             fullmatch=True))
def test_every_offer_round_trips(ip: object, port: int, name: str) -> None:
    offer = Offer(name, (str(ip), port))
    decoded = decode_request(encode_request(offer))
    assert isinstance(decoded, Offer) and decoded.source == name and decoded.address[1] == port


@pytest.mark.parametrize("observed, verdict", [
    ([], "unknown"),
    ([("203.0.113.7", 4433)], "unknown"),  # one report says nothing about other destinations
    ([("203.0.113.7", 4433), ("203.0.113.7", 4433), ("203.0.113.7", 4433)], "endpoint-independent"),
    ([("203.0.113.7", 4433), ("203.0.113.7", 61000)], "endpoint-dependent"),
    ([("203.0.113.7", 4433), ("10.0.0.5", 4433)], "several"),
])
def test_what_the_observed_addresses_say_about_the_nat(observed: list[tuple[str, int]], verdict: str) -> None:
    assert mapping(observed) == verdict
