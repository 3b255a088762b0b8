"""pki.authority as a library: what it issues satisfies quicmesh.protocol.identity; keys, overwrites, revocation."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from pki_helpers import make_ca, make_leaf, mode

from pki import PkiError
from pki.authority import (
    CertificateAuthority,
    create_intermediate_ca,
    create_root_ca,
    issue_node_cert,
    revoke,
    update_crl,
)
from quicmesh.errors import IdentityError, RevokedError
from quicmesh.protocol.identity import (
    TrustPolicy,
    fingerprint,
    identity_of,
    load_certificates,
    load_crl,
    load_private_key,
)

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def root_dir(tmp_path):
    create_root_ca(tmp_path / "ca", "prod")
    return tmp_path / "ca"


@pytest.fixture
def root(root_dir):
    return CertificateAuthority.open(root_dir)


def _policy(ca: CertificateAuthority, with_crl: bool = False) -> TrustPolicy:
    crls = [load_crl(ca.directory / "crl.pem")] if with_crl else []
    return TrustPolicy([ca.cert], ca.mesh, crls)


def test_root_ca_files_and_extensions(root_dir, root):
    assert mode(root_dir) == 0o700 and mode(root_dir / "ca.key") == 0o600
    assert mode(root_dir / "ca.crt") == 0o644 and mode(root_dir / "issued") == 0o700
    assert root.mesh == "prod" and root.chain == ()
    constraints = root.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert load_crl(root_dir / "crl.pem").is_signature_valid(root.cert.public_key())


@pytest.mark.parametrize("key_type", ["p256", "ed25519", "p384", "rsa2048"])
def test_node_cert_of_each_key_type_verifies(tmp_path, root, key_type):
    issued = issue_node_cert(root, "alpha", tmp_path / "alpha", key_type=key_type, dns=["Alpha.Example"],
                             ips=["10.0.0.1", "::1"])
    chain = load_certificates(issued.cert_path)
    assert _policy(root).verify(chain, expect_node="alpha").uri == "quicmesh://prod/alpha"
    extensions = chain[0].extensions
    assert extensions.get_extension_for_class(x509.KeyUsage).critical
    assert extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert set(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    names = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["alpha.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.1", "::1"]
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert mode(issued.key_path) == 0o600
    assert load_private_key(issued.key_path).public_key() == chain[0].public_key()


@pytest.mark.parametrize("key_type, fragment", [("p521", "aioquic cannot sign"), ("dsa", "unknown key type")])
def test_refused_key_types(tmp_path, root, key_type, fragment):
    with pytest.raises(PkiError, match=fragment):
        issue_node_cert(root, "alpha", tmp_path / "alpha", key_type=key_type)
    with pytest.raises(PkiError, match=fragment):
        create_root_ca(tmp_path / "other", "prod", key_type=key_type)
    assert not (tmp_path / "alpha").exists() and not (tmp_path / "other").exists()


@pytest.mark.parametrize("bad", [dict(node="Alpha"), dict(dns=["bad_name"]), dict(ips=["10.0.0.256"]),
                                 dict(days=0)])
def test_bad_node_arguments(tmp_path, root, bad):
    arguments = dict(node="alpha", dns=(), ips=(), days=365) | bad
    with pytest.raises(IdentityError if "node" in bad else PkiError):
        issue_node_cert(root, arguments.pop("node"), tmp_path / "n", **arguments)


def test_validity_is_clipped_to_the_issuer(tmp_path):
    create_root_ca(tmp_path / "ca", "prod", days=10)
    ca = CertificateAuthority.open(tmp_path / "ca")
    issued = issue_node_cert(ca, "alpha", tmp_path / "alpha", days=365)
    assert issued.cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    assert "clipped to the issuing CA's expiry" in issued.notes[0]


def test_ca_outside_its_validity_cannot_issue(tmp_path, root):
    with pytest.raises(PkiError, match="expired on"):
        issue_node_cert(root, "alpha", tmp_path / "alpha", now=NOW + dt.timedelta(days=4000))
    with pytest.raises(PkiError, match="cannot issue yet"):
        issue_node_cert(root, "alpha", tmp_path / "alpha", now=NOW - dt.timedelta(days=1))


def test_intermediate_chain(tmp_path, root):
    issued = create_intermediate_ca(tmp_path / "inter", root, days=20000)
    assert issued.cert.not_valid_after_utc <= root.cert.not_valid_after_utc and issued.notes
    inter = CertificateAuthority.open(tmp_path / "inter")
    assert inter.mesh == "prod" and inter.chain == (inter.cert,)
    node = issue_node_cert(inter, "alpha", tmp_path / "alpha")
    chain = load_certificates(node.cert_path)
    assert chain == [node.cert, inter.cert]  # node.crt: leaf, then the intermediate
    assert _policy(root).verify(chain).node == "alpha"
    with pytest.raises(PkiError, match="may not issue CA certificates"):
        create_intermediate_ca(tmp_path / "deeper", inter)
    with pytest.raises(PkiError, match="its own directory"):
        create_intermediate_ca(root.directory, root, force=True)


def test_existing_files_are_never_replaced_silently(tmp_path, root_dir, root):
    with pytest.raises(PkiError, match="ca.key exists; use --force to replace"):
        create_root_ca(root_dir, "prod")
    first = issue_node_cert(root, "alpha", tmp_path / "alpha")
    key_bytes = first.key_path.read_bytes()
    with pytest.raises(PkiError, match="node.key exists; use --force"):
        issue_node_cert(root, "alpha", tmp_path / "alpha")
    assert first.key_path.read_bytes() == key_bytes
    second = issue_node_cert(root, "alpha", tmp_path / "alpha", force=True)
    assert second.key_path.read_bytes() != key_bytes and mode(second.key_path) == 0o600
    assert not [p for p in (tmp_path / "alpha").iterdir() if p.name.startswith(".")]  # no temporary left


def test_encrypted_ca_key(tmp_path):
    create_root_ca(tmp_path / "ca", "prod", passphrase=b"pw")
    assert b"ENCRYPTED" in (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(IdentityError, match="wrong passphrase"):
        CertificateAuthority.open(tmp_path / "ca", b"other")
    assert CertificateAuthority.open(tmp_path / "ca", b"pw").key is not None
    with pytest.raises(PkiError, match="empty"):
        create_root_ca(tmp_path / "ca2", "prod", passphrase=b"")


def test_open_refuses_what_is_not_a_quicmesh_ca(tmp_path):
    with pytest.raises(PkiError, match="ca.crt is missing"):
        CertificateAuthority.open(tmp_path)
    (tmp_path / "ca.crt").write_bytes(make_ca().pem)
    with pytest.raises(PkiError, match="not a CA certificate made by quicmesh-pki"):
        CertificateAuthority.open(tmp_path, with_key=False)


def test_revoke_by_node_name_by_fingerprint_and_by_file(tmp_path, root):
    alpha = issue_node_cert(root, "alpha", tmp_path / "alpha")
    beta = issue_node_cert(root, "beta", tmp_path / "beta")
    gamma = issue_node_cert(root, "gamma", tmp_path / "gamma")
    update = revoke(root, "alpha")
    assert update.revoked == (alpha.cert,)
    update = revoke(root, fingerprint(beta.cert).upper())
    assert update.revoked == (beta.cert,)
    (tmp_path / "ca" / "issued" / f"{gamma.cert.serial_number:x}.pem").unlink()  # forgotten by the record
    with pytest.raises(PkiError, match="no certificate issued to node 'gamma'.*--cert"):
        revoke(root, "gamma")
    update = revoke(root, "gamma", gamma.cert_path)
    assert update.revoked == (gamma.cert,) and len(update.crl) == 3
    assert revoke(root, "alpha").already_revoked == (alpha.cert,)
    policy = _policy(root, with_crl=True)
    for issued in (alpha, beta, gamma):
        with pytest.raises(RevokedError):
            policy.verify(load_certificates(issued.cert_path))
    crl = load_crl(root.directory / "crl.pem")
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 5


def test_revoke_refuses(tmp_path, root):
    issue_node_cert(root, "alpha", tmp_path / "alpha")
    foreign = tmp_path / "foreign.crt"
    foreign.write_bytes(make_leaf(make_ca(), mesh="prod").pem)
    with pytest.raises(PkiError, match="not issued by the CA"):
        revoke(root, None, foreign)
    with pytest.raises(PkiError, match="not beta"):
        revoke(root, "beta", tmp_path / "alpha" / "node.crt")
    with pytest.raises(PkiError, match="neither a node name nor a sha256 fingerprint"):
        revoke(root, "Not_A_Name")
    with pytest.raises(PkiError, match="no certificate with fingerprint"):
        revoke(root, "sha256:" + "0" * 64)
    with pytest.raises(PkiError, match="say what to revoke"):
        revoke(root, None)


def test_crl_refresh_keeps_entries_and_refuses_a_foreign_crl(tmp_path, root):
    issue_node_cert(root, "alpha", tmp_path / "alpha")
    revoke(root, "alpha", now=NOW)
    refreshed = update_crl(root, now=NOW + dt.timedelta(days=20), days=7)
    assert len(refreshed.crl) == 1 and refreshed.revoked == ()
    assert refreshed.crl.next_update_utc.date() == (NOW + dt.timedelta(days=27)).date()
    create_root_ca(tmp_path / "other", "prod")
    (root.directory / "crl.pem").write_bytes((tmp_path / "other" / "crl.pem").read_bytes())
    with pytest.raises(PkiError, match="not signed by this CA"):
        update_crl(root)


def test_identity_of_issued_node(tmp_path, root):
    issued = issue_node_cert(root, "web-1", tmp_path / "web-1")
    assert identity_of(issued.cert).uri == "quicmesh://prod/web-1"
