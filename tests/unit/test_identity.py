"""quicmesh.protocol.identity: names, fingerprints, loading, and every rule of TrustPolicy.verify()."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier
from pki_helpers import DURING, T0, YEAR, flip_byte, key_usage, make_ca, make_crl, make_leaf

from quicmesh.errors import (
    ChainError,
    IdentityError,
    IdentityMismatchError,
    InvalidNameError,
    PinMismatchError,
    RevokedError,
    UsageError,
    ValidityError,
)
from quicmesh.protocol.identity import (
    CrlError,
    NodeIdentity,
    TrustPolicy,
    ca_mesh,
    fingerprint,
    identity_of,
    identity_uri,
    load_certificates,
    load_crl,
    load_crls,
    load_private_key,
    parse_identity_uri,
)
from quicmesh.protocol.dates import days_left
from quicmesh.protocol.fingerprints import normalize_fingerprint


@pytest.fixture(scope="module")
def root():
    return make_ca("Mesh Root")


@pytest.fixture(scope="module")
def inter(root):
    return make_ca("Mesh Intermediate", issuer=root, path_length=0)


@pytest.fixture(scope="module")
def policy(root):
    return TrustPolicy([root.cert], "m")


# --- names, URIs, identity_of ---------------------------------------------------------------------
def test_identity_uri_and_node_identity():
    assert identity_uri("prod", "alpha") == "quicmesh://prod/alpha"
    identity = NodeIdentity("prod", "alpha")
    assert identity.uri == str(identity) == "quicmesh://prod/alpha"
    with pytest.raises(AttributeError):
        identity.node = "beta"  # type: ignore[misc]


@pytest.mark.parametrize("mesh, node", [("Prod", "a"), ("p", "-a"), ("", "a"), ("p", "a_b"), ("p", "a" * 64),
                                        ("p", "a/b"), ("p", 7)])
def test_bad_names_are_refused(mesh, node):
    with pytest.raises(InvalidNameError):
        identity_uri(mesh, node)
    with pytest.raises(InvalidNameError):
        NodeIdentity(mesh, node)


@pytest.mark.parametrize("uri, error", [
    ("quicmesh://m", IdentityError),          # a CA's mesh URI, not a node
    ("https://m/n", IdentityError),
    ("quicmesh://m/n/extra", InvalidNameError),
    ("quicmesh://M/n", InvalidNameError),
    ("quicmesh:///n", InvalidNameError),
])
def test_parse_identity_uri_refuses(uri, error):
    with pytest.raises(error):
        parse_identity_uri(uri)


def test_identity_of_reads_the_one_quicmesh_uri(root):
    leaf = make_leaf(root, uris=["spiffe://example.org/x", "quicmesh://m/alpha"])
    assert identity_of(leaf.cert) == NodeIdentity("m", "alpha")


@pytest.mark.parametrize("uris, fragment", [
    ([], "no quicmesh:// URI SAN"),
    (["quicmesh://m/a", "quicmesh://m/b"], "exactly one"),
    (["quicmesh://m"], "no node"),
    (["quicmesh://m/Bad"], "upper-case"),
])
def test_identity_of_refuses(root, uris, fragment):
    with pytest.raises(IdentityError, match=fragment):
        identity_of(make_leaf(root, uris=uris).cert)


def test_malformed_extension_is_an_identity_error_not_a_value_error(root):
    junk_san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x00junk")
    bad = make_leaf(root, uris=[], extra=[(junk_san, False)]).cert
    with pytest.raises(IdentityError, match="malformed"):
        identity_of(bad)
    with pytest.raises(IdentityError, match="malformed"):
        TrustPolicy([root.cert], "m").verify([bad], now=DURING)


def test_ca_mesh():
    assert ca_mesh(make_ca().cert) is None
    assert ca_mesh(make_ca(uris=["quicmesh://prod"]).cert) == "prod"
    with pytest.raises(IdentityError, match="several meshes"):
        ca_mesh(make_ca(uris=["quicmesh://a", "quicmesh://b"]).cert)


# --- fingerprints ---------------------------------------------------------------------------------
def test_fingerprint_is_sha256_of_der(root):
    leaf = make_leaf(root)
    assert fingerprint(leaf.cert) == "sha256:" + hashlib.sha256(leaf.der).hexdigest()


def test_normalize_fingerprint_accepts_common_spellings(root):
    digest = hashlib.sha256(make_leaf(root).der).hexdigest()
    colons = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    for text in (f"sha256:{digest}", f"SHA256:{colons}", f"sha256:{digest.upper()}"):
        assert normalize_fingerprint(text) == f"sha256:{digest}"


@pytest.mark.parametrize("text", ["", "sha256:", "sha1:" + "ab" * 20, "ab" * 31, "zz" * 32, "ab:cd" + "ef" * 30,
                                  "sha256:" + "a" * 65, "ab" * 32, "sha256 Fingerprint=" + "ab" * 32,
                                  "sha256:a:b" + "cd" * 31, 42, None])
def test_normalize_fingerprint_refuses_junk(text):
    """The same rule as config pins: the sha256: prefix is required, colons only between byte pairs."""
    with pytest.raises(IdentityError, match="fingerprint"):
        normalize_fingerprint(text)


# --- loading --------------------------------------------------------------------------------------
def test_load_certificates_keeps_order(tmp_path, root, inter):
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(inter.pem + b"\n" + root.pem)
    assert [c.subject for c in load_certificates(bundle)] == [inter.cert.subject, root.cert.subject]
    assert load_certificates(root.pem)[0] == root.cert


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty"),
    (b"\x30\x82\x01\x00 der bytes", "not PEM"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PRIVATE KEY"),
    (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", "malformed"),
])
def test_load_certificates_refuses(tmp_path, content, fragment):
    path = tmp_path / "x.pem"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=fragment):
        load_certificates(path)


def test_load_certificates_missing_file(tmp_path):
    with pytest.raises(IdentityError, match="cannot read .*No such file"):
        load_certificates(tmp_path / "absent.pem")


def test_load_private_key(tmp_path, root):
    plain = tmp_path / "plain.key"
    plain.write_bytes(root.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    locked = tmp_path / "locked.key"
    locked.write_bytes(root.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"s3cret")))
    cert_file = tmp_path / "cert.pem"
    cert_file.write_bytes(root.pem)
    assert load_private_key(plain).public_key() == root.key.public_key()
    assert load_private_key(locked, b"s3cret").public_key() == root.key.public_key()
    with pytest.raises(IdentityError, match="wrong passphrase"):
        load_private_key(locked, b"nope")
    with pytest.raises(IdentityError, match="encrypted and no passphrase"):
        load_private_key(locked)
    with pytest.raises(IdentityError, match="not a PEM private key.*CERTIFICATE"):
        load_private_key(cert_file)
    with pytest.raises(IdentityError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")


def test_load_crl(tmp_path, root, inter):
    one, two = make_crl(root, []), make_crl(inter, [])
    path = tmp_path / "crl.pem"
    path.write_bytes(one.public_bytes(serialization.Encoding.PEM))
    assert load_crl(path) == one
    path.write_bytes(one.public_bytes(serialization.Encoding.PEM) + two.public_bytes(serialization.Encoding.PEM))
    assert load_crls(path) == [one, two]
    with pytest.raises(CrlError, match="2 CRLs"):
        load_crl(path)
    path.write_bytes(root.pem)
    with pytest.raises(CrlError, match="no PEM CRL.*CERTIFICATE"):
        load_crl(path)


def test_days_left(root):
    leaf = make_leaf(root)
    assert days_left(leaf.cert.not_valid_after_utc, now=T0) == pytest.approx(365)
    assert days_left(leaf.cert.not_valid_after_utc, now=T0 + 2 * YEAR) == pytest.approx(-365)


# --- TrustPolicy: accepted chains -------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["p256", "ed25519", "p384", "rsa2048"])
def test_node_key_types_are_accepted(root, policy, key_type):
    leaf = make_leaf(root, key_type=key_type)
    assert policy.verify([leaf.cert], now=DURING) == NodeIdentity("m", "alpha")


@pytest.mark.parametrize("ca_key_type", ["ed25519", "p384", "rsa2048"])
def test_ca_key_types_are_accepted(ca_key_type):
    ca = make_ca(key_type=ca_key_type)
    leaf = make_leaf(ca)
    assert TrustPolicy([ca.cert], "m").verify([leaf.cert], now=DURING).node == "alpha"


def test_all_checks_pass_with_every_option(root, policy):
    leaf = make_leaf(root, node="beta")
    identity = policy.verify([leaf.cert], now=DURING, expect_node="beta", allowed_nodes={"alpha", "beta"},
                             pin=fingerprint(leaf.cert).upper())
    assert identity.uri == "quicmesh://m/beta"


def test_naive_now_is_taken_as_utc(root, policy):
    assert policy.verify([make_leaf(root).cert], now=DURING.replace(tzinfo=None)).node == "alpha"


def test_intermediate_sent_by_peer(root, inter, policy):
    leaf = make_leaf(inter)
    assert policy.verify([leaf.cert, inter.cert], now=DURING).node == "alpha"


def test_intermediate_in_bundle(root, inter):
    leaf = make_leaf(inter)
    assert TrustPolicy([root.cert, inter.cert], "m").verify([leaf.cert], now=DURING).node == "alpha"
    assert TrustPolicy([inter.cert], "m").verify([leaf.cert], now=DURING).node == "alpha"


def test_renewed_ca_with_same_name_is_found(root):
    """Two bundle CAs with the same name (a renewal): the path builder tries both."""
    renewed = make_ca("Mesh Root")
    leaf = make_leaf(renewed)
    assert TrustPolicy([root.cert, renewed.cert], "m").verify([leaf.cert], now=DURING).node == "alpha"


# --- TrustPolicy: ChainError ----------------------------------------------------------------------
def test_foreign_ca(policy):
    foreign = make_ca("Someone Else")
    with pytest.raises(ChainError, match="Someone Else.*not in the mesh CA bundle.*foreign CA"):
        policy.verify([make_leaf(foreign).cert], now=DURING)


def test_foreign_ca_with_the_same_name(policy):
    impostor = make_ca("Mesh Root")
    with pytest.raises(ChainError, match="signature .* does not verify"):
        policy.verify([make_leaf(impostor).cert], now=DURING)


def test_missing_intermediate(inter, policy):
    with pytest.raises(ChainError, match="Mesh Intermediate.*intermediate is missing"):
        policy.verify([make_leaf(inter).cert], now=DURING)


def test_ca_certificate_presented_as_leaf(root, inter, policy):
    with pytest.raises(ChainError, match="mesh's own CA certificate"):
        policy.verify([root.cert], now=DURING)
    with pytest.raises(ChainError, match="mesh's own"):
        TrustPolicy([root.cert, inter.cert], "m").verify([inter.cert], now=DURING)


def test_tampered_signature(root, policy):
    leaf = make_leaf(root)
    with pytest.raises(ChainError, match="tampered"):
        policy.verify([flip_byte(leaf.der, len(leaf.der) - 5)], now=DURING)


def test_tampered_tbs(root, policy):
    leaf = make_leaf(root, node="alpha")
    index = leaf.cert.tbs_certificate_bytes.index(b"alpha") + leaf.der.index(leaf.cert.tbs_certificate_bytes)
    tampered = flip_byte(leaf.der, index)  # the subject CN becomes "`lpha"
    assert tampered.subject != leaf.cert.subject
    with pytest.raises(ChainError, match="tampered"):
        policy.verify([tampered], now=DURING)


def test_issuer_that_is_not_a_ca(root):
    not_a_ca = make_ca("Fake CA", ca=False)
    with pytest.raises(ChainError, match="not a CA"):
        TrustPolicy([root.cert], "m").verify([make_leaf(not_a_ca).cert, not_a_ca.cert], now=DURING)


def test_intermediate_without_key_cert_sign(root, policy):
    weak = make_ca("No Sign", issuer=root, usage=key_usage(crl_sign=True))
    with pytest.raises(ChainError, match="keyCertSign"):
        policy.verify([make_leaf(weak).cert, weak.cert], now=DURING)


def test_path_length_constraint(root, inter, policy):
    below = make_ca("Too Deep", issuer=inter)
    with pytest.raises(ChainError, match="pathLenConstraint"):
        policy.verify([make_leaf(below).cert, below.cert, inter.cert], now=DURING)


def test_unknown_critical_extension(root, policy):
    odd = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    with pytest.raises(ChainError, match="critical extension"):
        policy.verify([make_leaf(root, extra=[(odd, True)]).cert], now=DURING)


@pytest.mark.parametrize("chain, fragment", [([], "no certificate"), ([b"not a cert"], "not an x509")])
def test_malformed_chain_input(policy, chain, fragment):
    with pytest.raises(ChainError, match=fragment):
        policy.verify(chain, now=DURING)


# --- TrustPolicy: ValidityError -------------------------------------------------------------------
def test_expired_leaf(root, policy):
    leaf = make_leaf(root)
    with pytest.raises(ValidityError, match=r"quicmesh://m/alpha expired on 2031-01-01 00:00:00 UTC"):
        policy.verify([leaf.cert], now=T0 + YEAR + dt.timedelta(seconds=1))


def test_not_yet_valid_leaf(root, policy):
    leaf = make_leaf(root)
    with pytest.raises(ValidityError, match=r"not valid before 2030-01-01 00:00:00 UTC.*check clocks"):
        policy.verify([leaf.cert], now=T0 - dt.timedelta(minutes=1))


def test_expired_intermediate(root, policy):
    short = make_ca("Short Intermediate", issuer=root, not_after=T0 + dt.timedelta(days=10))
    leaf = make_leaf(short)
    with pytest.raises(ValidityError, match="CA certificate 'CN=Short Intermediate' expired"):
        policy.verify([leaf.cert, short.cert], now=T0 + dt.timedelta(days=20))


def test_expired_root():
    old = make_ca("Old Root", not_after=T0 + dt.timedelta(days=10))
    leaf = make_leaf(old)
    with pytest.raises(ValidityError, match="CA certificate 'CN=Old Root' expired"):
        TrustPolicy([old.cert], "m").verify([leaf.cert], now=T0 + dt.timedelta(days=20))


# --- TrustPolicy: UsageError ----------------------------------------------------------------------
def test_only_server_auth(root, policy):
    leaf = make_leaf(root, ekus=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(UsageError, match="lacks extended key usage clientAuth"):
        policy.verify([leaf.cert], now=DURING)


def test_no_eku(root, policy):
    with pytest.raises(UsageError, match="serverAuth and clientAuth"):
        policy.verify([make_leaf(root, ekus=()).cert], now=DURING)


def test_key_usage_without_digital_signature(root, policy):
    with pytest.raises(UsageError, match="digitalSignature"):
        policy.verify([make_leaf(root, usage=key_usage(key_encipherment=True)).cert], now=DURING)


def test_leaf_that_is_a_ca(root, policy):
    with pytest.raises(UsageError, match="is a CA certificate"):
        policy.verify([make_leaf(root, ca=True).cert], now=DURING)


# --- TrustPolicy: RevokedError and CRL loading --------------------------------------------------
def test_revoked_by_crl(root):
    leaf, other = make_leaf(root), make_leaf(root, node="beta")
    policy = TrustPolicy([root.cert], "m", crls=[make_crl(root, [leaf.cert])])
    with pytest.raises(RevokedError, match=r"quicmesh://m/alpha \(serial [0-9a-f]+\) was revoked on 2030-01-02"):
        policy.verify([leaf.cert], now=DURING)
    assert policy.verify([other.cert], now=DURING).node == "beta"


def test_intermediate_revoked_by_root_crl(root, inter):
    policy = TrustPolicy([root.cert], "m", crls=[make_crl(root, [inter.cert])])
    with pytest.raises(RevokedError, match="Mesh Intermediate"):
        policy.verify([make_leaf(inter).cert, inter.cert], now=DURING)


def test_crl_of_an_intermediate_in_the_bundle(root, inter):
    leaf = make_leaf(inter)
    policy = TrustPolicy([root.cert, inter.cert], "m", crls=[make_crl(inter, [leaf.cert])])
    with pytest.raises(RevokedError):
        policy.verify([leaf.cert], now=DURING)


def test_same_serial_from_another_issuer_is_not_revoked(root, inter):
    """Revocation is by issuer + serial: the root's CRL says nothing about the intermediate's serials."""
    leaf = make_leaf(inter)
    policy = TrustPolicy([root.cert, inter.cert], "m", crls=[make_crl(root, [leaf.cert])])
    assert policy.verify([leaf.cert], now=DURING).node == "alpha"


def test_crl_signed_by_another_ca_is_refused(tmp_path, root):
    forged = make_crl(make_ca("Mesh Root"), [])  # same issuer name, another key
    with pytest.raises(CrlError, match="not signed by any CA of the mesh CA bundle"):
        TrustPolicy([root.cert], "m", crls=[forged])
    ca_file, crl_file = tmp_path / "ca.crt", tmp_path / "crl.pem"
    ca_file.write_bytes(root.pem)
    crl_file.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CrlError, match=f"{crl_file}: .*not signed"):
        TrustPolicy.from_files(ca_file, "m", crl_path=crl_file)


def test_denylist(root):
    leaf = make_leaf(root)
    digest = fingerprint(leaf.cert).removeprefix("sha256:")
    colons = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    policy = TrustPolicy([root.cert], "m", denylist=["SHA256:" + colons])
    with pytest.raises(RevokedError, match="denylist"):
        policy.verify([leaf.cert], now=DURING)


def test_from_files(tmp_path, root):
    leaf = make_leaf(root)
    ca_file, crl_file = tmp_path / "ca.crt", tmp_path / "crl.pem"
    ca_file.write_bytes(root.pem)
    crl_file.write_bytes(make_crl(root, [leaf.cert]).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(RevokedError):
        TrustPolicy.from_files(ca_file, "m", crl_path=crl_file).verify([leaf.cert], now=DURING)


@pytest.mark.parametrize("make_args, error, fragment", [
    (lambda root, leaf: ([], "m"), ChainError, "empty"),
    (lambda root, leaf: ([leaf], "m"), ChainError, "not a CA certificate"),
    (lambda root, leaf: ([root], "Bad Mesh"), InvalidNameError, "mesh"),
    (lambda root, leaf: ([root], "m", (), ["junk"]), IdentityError, "fingerprint"),
    (lambda root, leaf: ([root], "m", (), "sha256:" + "a" * 64), IdentityError, "not a single string"),
    (lambda root, leaf: ([root], "m", [root]), CrlError, "CertificateRevocationList"),
])
def test_bad_policy_construction(root, make_args, error, fragment):
    with pytest.raises(error, match=fragment):
        TrustPolicy(*make_args(root.cert, make_leaf(root).cert))


# --- TrustPolicy: identity and pin ----------------------------------------------------------------
def test_wrong_mesh(root, policy):
    with pytest.raises(IdentityMismatchError, match="certificate is for mesh 'other'.*this mesh is 'm'"):
        policy.verify([make_leaf(root, mesh="other").cert], now=DURING)


def test_wrong_node(root, policy):
    with pytest.raises(IdentityMismatchError, match="expected node 'beta'.*quicmesh://m/alpha"):
        policy.verify([make_leaf(root).cert], now=DURING, expect_node="beta")


def test_node_not_allowed(root, policy):
    with pytest.raises(IdentityMismatchError, match="not a configured peer"):
        policy.verify([make_leaf(root).cert], now=DURING, allowed_nodes=["beta", "gamma"])


def test_leaf_without_identity(root, policy):
    with pytest.raises(IdentityError, match="no quicmesh:// URI SAN"):
        policy.verify([make_leaf(root, uris=[]).cert], now=DURING)


def test_pin_mismatch(root, policy):
    leaf, other = make_leaf(root), make_leaf(root)
    with pytest.raises(PinMismatchError, match="pinned fingerprint is " + fingerprint(other.cert)):
        policy.verify([leaf.cert], now=DURING, pin=fingerprint(other.cert))
    with pytest.raises(IdentityError, match="invalid fingerprint"):
        policy.verify([leaf.cert], now=DURING, pin="not-a-fingerprint")


def test_every_single_byte_corruption_is_an_identity_error(root, inter):
    """Whatever bytes a peer sends, loading and verify() raise IdentityError subclasses, nothing else;
    and no change to the signed part or to the signature is accepted."""
    policy = TrustPolicy([root.cert], "m")
    leaf = make_leaf(inter)
    for index in range(len(leaf.der)):
        corrupted = bytearray(leaf.der)
        corrupted[index] ^= 0x01
        pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(corrupted)) + b"-----END CERTIFICATE-----\n"
        try:
            accepted = policy.verify([*load_certificates(pem), inter.cert], now=DURING)
        except IdentityError:
            continue
        # Only the BIT STRING's "unused bits" byte outside the signed part can change unnoticed.
        reloaded = load_certificates(pem)[0]
        assert accepted.node == "alpha"
        assert reloaded.tbs_certificate_bytes == leaf.cert.tbs_certificate_bytes
        assert reloaded.signature == leaf.cert.signature


def test_hostile_chain_is_refused_quickly(root, policy):
    """Certificates that all issue each other (same name, same key) must not make the search explode."""
    loop_key = make_ca("Loop").key
    loop = [make_ca("Loop", key=loop_key) for _ in range(6)]  # self-issued: each one verifies every other
    leaf = make_leaf(loop[0])
    started = time.monotonic()
    with pytest.raises(ChainError):
        policy.verify([leaf.cert, *[made.cert for made in loop]], now=DURING)
    assert time.monotonic() - started < 1.0
    with pytest.raises(ChainError, match="at most 8"):
        policy.verify([leaf.cert] + [made.cert for made in loop] * 2, now=DURING)
