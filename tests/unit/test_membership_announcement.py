"""quicmesh.membership.announcement: signed announcements with real certificates — round trip, the layout of
docs/PROTOCOL.md, every rejection reason of verify_announcement, size bounds, and hostile bytes."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import UnrecognizedExtension
from cryptography.x509.oid import ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_helpers import DURING, T0, make_ca, make_crl, make_leaf
from test_wire_relay import decodes_or_protocol_error, mutated

from pki.authority import (
    CertificateAuthority,
    create_intermediate_ca,
    create_root_ca,
    issue_node_cert,
)
from pki.defaults import KEY_TYPES
from quicmesh.errors import (
    AnnouncementError,
    ChainError,
    IdentityError,
    IdentityMismatchError,
    InvalidNameError,
    ProtocolError,
    RevokedError,
    ValidityError,
)
from quicmesh.membership.announcement import (
    MAX_ANNOUNCEMENT_SIZE,
    SIGNATURE_CONTEXT,
    Announcement,
    decode_announcement,
    sign_announcement,
    verify_announcement,
)
from quicmesh.protocol.identity import (
    NodeIdentity,
    TrustPolicy,
    load_certificates,
    load_private_key,
)
from quicmesh.protocol.wire import encode_varint

NOW = int(DURING.timestamp())
MAX_AGE = 300.0


@pytest.fixture(scope="module")
def root():
    return make_ca("Mesh Root")


@pytest.fixture(scope="module")
def inter(root):
    return make_ca("Mesh Intermediate", issuer=root, path_length=0)


@pytest.fixture(scope="module")
def alpha(inter):
    return make_leaf(inter, "alpha")


@pytest.fixture(scope="module")
def beta(inter):
    return make_leaf(inter, "beta")


@pytest.fixture(scope="module")
def trust(root):
    return TrustPolicy([root.cert], "m")


def announce(member, inter, **overrides) -> Announcement:
    """``member``'s announcement (chain: its leaf and the intermediate), fields overridable."""
    fields = {"mesh": "m", "node": member.cert.subject.rfc4514_string().removeprefix("CN="),
              "version": NOW * 1_000_000, "epoch": 0x2A2A_2A2A_2A2A, "issued_at": NOW,
              "addresses": ("10.0.0.1:4433", "[2001:db8::1]:4433"), "services": ("ssh", "dns"), "relay": True,
              "leaving": False, "chain": [member.cert, inter.cert], "key": member.key}
    return sign_announcement(**{**fields, **overrides})


def rejection(announcement: Announcement, trust: TrustPolicy, *, now: dt.datetime = DURING) -> IdentityError:
    """The error verify_announcement raises; its message must be one line."""
    with pytest.raises(IdentityError) as caught:
        verify_announcement(announcement, trust, now=now, max_age=MAX_AGE)
    assert "\n" not in str(caught.value) and str(caught.value), caught.value
    return caught.value


def signed_part(raw: bytes, signature: bytes) -> bytes:
    return raw[: len(raw) - len(encode_varint(len(signature))) - len(signature)]


# --- round trip ---------------------------------------------------------------------------------
def test_round_trip_decodes_equal_and_verifies(alpha, inter, trust) -> None:
    sent = announce(alpha, inter, leaving=True, relay=False)
    received = decode_announcement(sent.raw)
    assert received == sent and received.raw == sent.raw
    assert (received.relay, received.leaving, received.services) == (False, True, ("ssh", "dns"))
    assert verify_announcement(received, trust, now=DURING, max_age=MAX_AGE) == NodeIdentity("m", "alpha")


def test_layout_is_the_one_docs_protocol_describes(alpha, inter) -> None:
    """The example of docs/PROTOCOL.md "Membership", byte for byte."""
    sent = announce(alpha, inter, version=1, epoch=7, issued_at=1_900_000_000, relay=True,
                    addresses=("10.0.0.1:4433",), services=(), chain=[alpha.cert])
    head = bytes.fromhex("01 01 6d 05 61 6c 70 68 61 01 07 c0 00 00 00 71 3f b3 00 01 01 0d 31 30 2e 30 2e 30 2e 31"
                         "3a 34 34 33 33 00 01")
    der = sent.chain[0]
    assert sent.raw == head + encode_varint(len(der)) + der + encode_varint(len(sent.signature)) + sent.signature


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_key_type_quicmesh_pki_issues_signs_and_verifies(tmp_path: Path, key_type: str) -> None:
    """Root -> intermediate -> node made by pki/authority and read back from its files, as a node does."""
    create_root_ca(tmp_path / "root", "prod", key_type=key_type)
    create_intermediate_ca(tmp_path / "inter", CertificateAuthority.open(tmp_path / "root"), key_type=key_type)
    issued = issue_node_cert(CertificateAuthority.open(tmp_path / "inter"), "alpha", tmp_path / "alpha",
                             key_type=key_type)
    chain = load_certificates(issued.cert_path)
    assert len(chain) == 2
    sent = sign_announcement(mesh="prod", node="alpha", version=1, epoch=7, issued_at=int(dt.datetime.now().timestamp()),
                             addresses=("alpha.example.net:4433",), services=(), relay=False, leaving=False,
                             chain=chain, key=load_private_key(issued.key_path))
    policy = TrustPolicy(load_certificates(tmp_path / "root" / "ca.crt"), "prod")
    assert verify_announcement(decode_announcement(sent.raw), policy, max_age=MAX_AGE).node == "alpha"


# --- rejections ---------------------------------------------------------------------------------
def test_a_flipped_byte_anywhere_in_the_signed_part_is_rejected(alpha, inter, trust) -> None:
    sent = announce(alpha, inter)
    signed = signed_part(sent.raw, sent.signature)
    for index in range(len(signed)):  # every byte: ~1,000 decode+verify rounds, about a second
        tampered = bytearray(sent.raw)
        tampered[index] ^= 0x01
        try:
            received = decode_announcement(bytes(tampered))
        except ProtocolError:
            continue  # structurally broken: rejected before any check
        rejection(received, trust)


def test_a_flipped_signature_byte_is_rejected(alpha, inter, trust) -> None:
    sent = announce(alpha, inter)
    tampered = bytearray(sent.raw)
    tampered[-1] ^= 0x01
    assert "signature does not verify" in str(rejection(decode_announcement(bytes(tampered)), trust))


def test_fields_changed_after_decoding_are_rejected(alpha, inter, trust) -> None:
    received = decode_announcement(announce(alpha, inter).raw)
    moved = dataclasses.replace(received, addresses=("192.0.2.66:4433",))
    assert "canonical encoding" in str(rejection(moved, trust))


def test_non_shortest_varints_are_rejected(alpha, inter, trust) -> None:
    """Decoders accept long varints (RFC 9000), but a signature covers the canonical encoding only."""
    sent = announce(alpha, inter, epoch=5)
    at = sent.raw.index(encode_varint(NOW * 1_000_000)) + 8  # the epoch varint, one byte: 0x05
    assert sent.raw[at] == 5
    stretched = sent.raw[:at] + bytes([0x40, 5]) + sent.raw[at + 1:]
    assert "canonical encoding" in str(rejection(decode_announcement(stretched), trust))


def test_a_signature_by_another_members_key_is_rejected(alpha, beta, inter, trust) -> None:
    """alpha re-signs beta's announcement (beta's chain, node beta) with alpha's key."""
    genuine = announce(beta, inter)
    signed = signed_part(genuine.raw, genuine.signature)
    signature = alpha.key.sign(SIGNATURE_CONTEXT + signed, ec.ECDSA(hashes.SHA256()))
    forged = decode_announcement(signed + encode_varint(len(signature)) + signature)
    assert "signature does not verify" in str(rejection(forged, trust))


def test_a_member_announcing_another_members_name_is_rejected(alpha, inter, trust) -> None:
    """alpha signs, with its own key and chain, an announcement for node beta."""
    error = rejection(decode_announcement(announce(alpha, inter, node="beta").raw), trust)
    assert isinstance(error, IdentityMismatchError) and "beta" in str(error) and "alpha" in str(error)


def test_a_chain_from_another_ca_is_rejected(trust) -> None:
    foreign_root = make_ca("Mesh Root")  # same name, other key: a forger's CA
    foreign_inter = make_ca("Mesh Intermediate", issuer=foreign_root, path_length=0)
    mallory = make_leaf(foreign_inter, "alpha")
    assert isinstance(rejection(announce(mallory, foreign_inter), trust), ChainError)


def test_a_revoked_leaf_is_rejected(root, inter, alpha) -> None:
    revoking = TrustPolicy([root.cert, inter.cert], "m", crls=[make_crl(inter, [alpha.cert])])
    assert isinstance(rejection(announce(alpha, inter), revoking), RevokedError)


def test_an_expired_certificate_is_rejected(inter, trust) -> None:
    short = make_leaf(inter, "gamma", not_after=T0 + dt.timedelta(days=2))
    later = T0 + dt.timedelta(days=3)
    sent = announce(short, inter, issued_at=int(later.timestamp()))
    assert isinstance(rejection(sent, trust, now=later), ValidityError)


def test_another_meshs_certificate_is_rejected(inter, trust) -> None:
    other = make_leaf(inter, "alpha", mesh="other")
    error = rejection(announce(other, inter, mesh="other"), trust)
    assert isinstance(error, IdentityMismatchError) and "other" in str(error)


def test_an_announcement_naming_another_mesh_is_rejected(alpha, inter, trust) -> None:
    error = rejection(announce(alpha, inter, mesh="other"), trust)
    assert isinstance(error, AnnouncementError) and "names mesh 'other'" in str(error)


@pytest.mark.parametrize(("issued_at", "reason"), [(NOW - 301, "stale: issued 301 s ago"),
                                                   (NOW + 400, "400 s in the future")])
def test_issued_at_out_of_its_window_is_rejected(alpha, inter, trust, issued_at: int, reason: str) -> None:
    error = rejection(announce(alpha, inter, issued_at=issued_at), trust)
    assert isinstance(error, AnnouncementError) and reason in str(error)


@pytest.mark.parametrize("issued_at", [NOW - 300, NOW + 300])
def test_issued_at_at_the_window_edges_is_accepted(alpha, inter, trust, issued_at: int) -> None:
    assert verify_announcement(announce(alpha, inter, issued_at=issued_at), trust, now=DURING, max_age=MAX_AGE)


def test_a_certificate_that_is_not_der_is_rejected(alpha, inter, trust) -> None:
    sent = announce(alpha, inter)
    garbled = dataclasses.replace(sent, chain=(b"not a certificate", *sent.chain[1:]))
    assert "not a DER certificate" in str(rejection(garbled, trust))


# --- bounds on encode (the caller's mistake) ------------------------------------------------------
@pytest.mark.parametrize(("overrides", "error", "fragment"), [
    ({"addresses": tuple(f"10.0.0.{i}:1" for i in range(9))}, ValueError, "9 addresses (at most 8)"),
    ({"addresses": (("a" * 60 + ".") * 4 + "example:4433",)}, ValueError, "address of 256 bytes"),
    ({"addresses": ("10.0.0.1",)}, ValueError, "no port"),
    ({"addresses": ("10.0.0.1:1", "10.0.0.1:1")}, ValueError, "each address and each service once"),
    ({"services": tuple(f"s{i}" for i in range(33))}, ValueError, "33 services (at most 32)"),
    ({"services": ("Bad_Name",)}, InvalidNameError, "invalid service name"),
    ({"node": "Alpha"}, InvalidNameError, "invalid node name"),
    ({"version": -1}, ValueError, "version -1 is out of range"),
    ({"epoch": 2**62}, ValueError, "epoch 4611686018427387904 is out of range"),
    ({"chain": []}, ValueError, "needs the node's certificate chain"),
])
def test_encode_refuses_out_of_bounds_values(alpha, inter, overrides, error, fragment) -> None:
    with pytest.raises(error) as caught:
        announce(alpha, inter, **overrides)
    assert fragment in str(caught.value)


def test_encode_refuses_a_chain_of_five(alpha, inter) -> None:
    with pytest.raises(ValueError, match="chain of 5 certificates"):
        announce(alpha, inter, chain=[alpha.cert] + [inter.cert] * 4)


def test_encode_refuses_a_key_that_is_not_the_leafs(alpha, beta, inter) -> None:
    with pytest.raises(AnnouncementError, match="not the key of the node certificate quicmesh://m/alpha"):
        announce(alpha, inter, key=beta.key)


def test_encode_refuses_more_than_the_size_limit(inter) -> None:
    padding = UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x00" * 6500)
    bulky = make_leaf(inter, "bulky", extra=[(padding, False)])
    with pytest.raises(ValueError, match=f"over the {MAX_ANNOUNCEMENT_SIZE}-byte limit"):
        announce(bulky, inter, chain=[bulky.cert] * 4)


# --- bounds on decode and hostile bytes ---------------------------------------------------------
def test_decode_refuses_oversized_and_out_of_bounds_input(alpha, inter) -> None:
    raw = announce(alpha, inter, addresses=("10.0.0.1:4433",), services=()).raw
    addresses_at = raw.index(b"\x01\x0d10.0.0.1:4433")
    cases = {
        b"\x01" * (MAX_ANNOUNCEMENT_SIZE + 1): "over the 24576-byte limit",
        b"\x02" + raw[1:]: "announcement format 2",
        raw[:addresses_at] + b"\x09" + raw[addresses_at + 1:]: "claims 9 addresses",
        raw[:addresses_at - 1] + b"\x04" + raw[addresses_at:]: "unknown bits",
        raw[:addresses_at] + b"\x01\x0810.0.0.1" + raw[addresses_at + 15:]: "not HOST:PORT",
        raw + b"\x00": "1 trailing bytes",
        raw[:-1]: "truncated",
    }
    for data, fragment in cases.items():
        with pytest.raises(ProtocolError) as caught:
            decode_announcement(data)
        assert fragment in str(caught.value), (fragment, caught.value)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_raise_only_protocol_error(data: bytes) -> None:
    decodes_or_protocol_error(decode_announcement, data)
    decodes_or_protocol_error(decode_announcement, b"\x01" + data)  # past the format byte


@pytest.fixture(scope="module")
def valid_encoding(alpha, inter) -> bytes:
    return announce(alpha, inter).raw


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_mutated_announcements_raise_only_protocol_error(valid_encoding: bytes, data: st.DataObject) -> None:
    decodes_or_protocol_error(decode_announcement, data.draw(mutated(valid_encoding)))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_announcements_that_decode_fail_verification_with_an_identity_error(
        valid_encoding: bytes, trust: TrustPolicy, data: st.DataObject) -> None:
    """The runtime catches IdentityError around verify_announcement: nothing else may escape it."""
    mutant = data.draw(mutated(valid_encoding))
    try:
        received = decode_announcement(mutant)
    except ProtocolError:
        return
    if mutant != valid_encoding:
        rejection(received, trust)

