"""quicmesh.membership.messages: every message round-trips, the examples of docs/PROTOCOL.md, bounds on
encode (ValueError) and decode (ProtocolError), and hostile bytes raise only ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire_relay import decodes_or_protocol_error, mutated

from quicmesh.errors import ProtocolError
from quicmesh.membership.codec import MAX_ANNOUNCEMENT_SIZE
from quicmesh.membership.messages import (
    MAX_ANNOUNCE_BATCH,
    MAX_CRL_SIZE,
    MAX_ENTRIES,
    Announce,
    Crl,
    Digest,
    DigestReply,
    Sync,
    SyncReply,
    decode_message,
    encode_message,
)

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
versions = st.integers(0, 2**62 - 1)
crl_numbers = st.integers(0, 2**160 - 1)
raws = st.binary(min_size=1, max_size=60)
messages = st.one_of(
    st.builds(Announce, st.lists(raws, max_size=5).map(tuple)),
    st.builds(Sync, st.binary(min_size=32, max_size=32), versions, crl_numbers),
    st.builds(SyncReply, st.booleans(), crl_numbers),
    st.builds(Digest, st.dictionaries(names, versions, max_size=6).map(lambda d: tuple(d.items())), crl_numbers),
    st.builds(DigestReply, st.lists(raws, max_size=4).map(tuple), st.lists(names, max_size=4, unique=True).map(tuple),
              st.none() | st.binary(min_size=1, max_size=40)),
    st.builds(Crl, st.binary(min_size=1, max_size=60)),
)


@settings(max_examples=400, deadline=None)
@given(message=messages)
def test_every_message_round_trips(message) -> None:
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(("message", "encoded"), [
    (Announce((b"\xaa\xbb", b"\xcc")), "01 02 02 aa bb 01 cc"),
    (Sync(bytes(range(32)), 3, 7), "02 " + bytes(range(32)).hex(" ") + " 03 01 07"),
    (SyncReply(True, 0), "03 01 00"),
    (SyncReply(False, 0x0102), "03 00 02 01 02"),
    (Digest((("alpha", 5),), 1), "04 01 01 01 05 61 6c 70 68 61 05"),
    (DigestReply((b"\xaa",), ("beta",), None), "05 01 01 aa 01 04 62 65 74 61 00"),
    (DigestReply((), (), b"\x30\x00"), "05 00 00 01 02 30 00"),
    (Crl(b"\x30\x00"), "06 30 00"),
])
def test_examples_of_docs_protocol(message, encoded: str) -> None:
    assert encode_message(message).hex(" ") == encoded
    assert decode_message(bytes.fromhex(encoded)) == message


def test_a_crl_number_of_20_octets_fits() -> None:
    """RFC 5280 CRL numbers go up to 20 octets: more than a varint holds."""
    largest = 2**160 - 1
    assert decode_message(encode_message(SyncReply(False, largest))) == SyncReply(False, largest)
    with pytest.raises(ValueError, match="CRL number"):
        encode_message(SyncReply(False, 2**160))


@pytest.mark.parametrize(("message", "fragment"), [
    (Announce((b"x",) * (MAX_ANNOUNCE_BATCH + 1)), "65 announcements (at most 64)"),
    (Announce((b"",)), "announcement of 0 bytes"),
    (Announce((b"x" * (MAX_ANNOUNCEMENT_SIZE + 1),)), "announcement of 24577 bytes"),
    (Sync(b"short", 1, 0), "digest is 32 bytes, not 5"),
    (Sync(bytes(32), -1, 0), "member count -1"),
    (SyncReply(True, -1), "CRL number -1"),
    (Digest((("Alpha", 1),), 0), "node 'Alpha' is not a valid name"),
    (Digest((("alpha", 1), ("alpha", 2)), 0), "each node once"),
    (Digest((("alpha", 2**62),), 0), "version 4611686018427387904 is out of range"),
    (DigestReply((), ("beta", "beta"), None), "each node once"),
    (DigestReply((), (), b"x" * (MAX_CRL_SIZE + 1)), "CRL of 1048577 bytes"),
    (Crl(b""), "CRL of 0 bytes"),
    ("not a message", "not a membership message: str"),
])
def test_encode_refuses_out_of_bounds_values(message, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        encode_message(message)
    assert fragment in str(caught.value)


def test_encode_refuses_more_entries_than_the_bound() -> None:
    entries = tuple((f"n{i}", 1) for i in range(MAX_ENTRIES + 1))
    with pytest.raises(ValueError, match="100001 Digest entries"):
        encode_message(Digest(entries, 0))


@pytest.mark.parametrize(("encoded", "fragment"), [
    ("", "truncated membership message"),
    ("07", "unknown membership message type 7"),
    ("01 40 41 00", "claims 65 announcements"),
    ("01 01 00 00", "announcement of 0 bytes"),
    ("01 01 05 aa", "truncated membership message (announcement)"),
    ("02 00 01", "truncated Sync digest"),
    ("03 02 00", "same flag 2"),
    ("03 00 15" + " 01" * 21, "CRL number of 21 bytes"),
    ("04 00 02 01 61 01", "claims 2 Digest entries"),
    ("04 00 02 01 61 01 01 61 02", "Digest lists a node twice"),
    ("04 00 01 01 41 01", "node is not a valid name"),
    ("05 00 02 01 62 01 62 00", "wants a node twice"),
    ("05 00 00 02", "CRL flag 2"),
    ("05 00 00 01 00", "CRL of 0 bytes"),
    ("06", "Crl of 0 bytes"),
    ("03 01 00 00", "1 trailing bytes"),
])
def test_decode_refuses_malformed_and_out_of_bounds_bodies(encoded: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(bytes.fromhex(encoded))
    assert fragment in str(caught.value), caught.value


def test_decode_bounds_claims_to_the_bytes_present() -> None:
    """A count near the limit with no bytes behind it fails at once, without building entries."""
    with pytest.raises(ProtocolError, match="claims 100000 Digest entries"):
        decode_message(b"\x04\x00" + bytes.fromhex("80 01 86 a0"))
    with pytest.raises(ProtocolError, match="claims 100001 Digest entries"):
        decode_message(b"\x04\x00" + bytes.fromhex("80 01 86 a1") + b"\x01a\x01" * 100_001)


@settings(max_examples=600, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_raise_only_protocol_error(data: bytes) -> None:
    decodes_or_protocol_error(decode_message, data)
    for kind in range(1, 7):  # past the type byte, into each message's fields
        decodes_or_protocol_error(decode_message, bytes((kind,)) + data)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), message=messages)
def test_mutated_messages_raise_only_protocol_error(data: st.DataObject, message) -> None:
    decodes_or_protocol_error(decode_message, data.draw(mutated(encode_message(message))))
