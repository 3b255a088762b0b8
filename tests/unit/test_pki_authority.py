"""pki.authority as a library: what it issues satisfies quicmesh.protocol.identity; keys, overwrites, revocation."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki_helpers import key_usage, make_ca, make_leaf, mode, new_key

from pki import PkiError
from pki.authority import (
    CertificateAuthority,
    create_intermediate_ca,
    create_root_ca,
    generate_key,
    issue_node_cert,
    issued_certificates,
    revoke,
    update_crl,
)
from pki.csr import create_csr, issue_from_csr, key_type_of, renew_node_cert
from pki.bootstrap import write_node_config
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


# --- CSRs and renewal (issue 19) ----------------------------------------------------------------
def _csr_file(path, key, *, names=(), extensions=()):
    """A CSR signed by ``key`` with SANs ``names`` and any extra extensions: what a node (or a crook) sends."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whoever")]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    signing_hash = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    path.write_bytes(builder.sign(key, signing_hash).public_bytes(serialization.Encoding.PEM))
    return path


def _uri(text):
    return x509.UniformResourceIdentifier(text)


def test_csr_then_issue_from_csr(tmp_path, root):
    made = create_csr(tmp_path / "node", "prod", "alpha", dns=["Alpha.Example"], ips=["10.0.0.1"])
    assert mode(made.key_path) == 0o600 and mode(made.csr_path) == 0o644 and made.csr.is_signature_valid
    issued = issue_from_csr(root, made.csr_path, tmp_path / "node")
    assert issued.key_path is None and issued.notes == ()
    chain = load_certificates(issued.cert_path)
    assert _policy(root).verify(chain, expect_node="alpha").uri == "quicmesh://prod/alpha"
    assert chain[0].public_key() == load_private_key(made.key_path).public_key()
    names = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["alpha.example"]
    assert [cert.serial_number for cert in issued_certificates(root)] == [issued.cert.serial_number]


def test_issue_from_csr_applies_the_ca_policy_only(tmp_path, root):
    key = new_key()
    csr = _csr_file(tmp_path / "evil.csr", key, names=[_uri("quicmesh://prod/evil")], extensions=[
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (key_usage(key_cert_sign=True, crl_sign=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), False),
    ])
    issued = issue_from_csr(root, csr, tmp_path / "evil")
    extensions = issued.cert.extensions
    assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert {extension.oid.dotted_string for extension in extensions} == {
        "2.5.29.14", "2.5.29.35", "2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.17"}  # SKI AKI BC KU EKU SAN
    assert "basicConstraints CA:TRUE" in issued.notes[0] and "1.3.6.1.4.1.99999.1" in issued.notes[0]
    assert _policy(root).verify(load_certificates(issued.cert_path), expect_node="evil").node == "evil"


@pytest.mark.parametrize("names, node, fragment", [
    ([_uri("quicmesh://other/alpha")], None, "serves mesh 'prod'"),
    ([_uri("quicmesh://prod/beta")], "alpha", "not for node 'alpha'"),
    ([_uri("quicmesh://prod/a"), _uri("quicmesh://prod/b")], None, "two identities"),
    ([_uri("quicmesh://prod")], None, "no node"),
    ([_uri("https://example.com/")], "alpha", "URI:https://example.com/"),
    ([x509.RFC822Name("a@example.com")], "alpha", "email:a@example.com"),
    ([x509.DNSName("bad_name")], "alpha", "invalid DNS name"),
    ([], None, "give the node name"),
])
def test_issue_from_csr_refuses(tmp_path, root, names, node, fragment):
    csr = _csr_file(tmp_path / "x.csr", new_key(), names=names)
    with pytest.raises(PkiError, match=re.escape(fragment)):
        issue_from_csr(root, csr, tmp_path / "out", node=node)
    assert not (tmp_path / "out" / "node.crt").exists() and issued_certificates(root) == []


@pytest.mark.parametrize("key, fragment", [
    (lambda: ec.generate_private_key(ec.SECP521R1()), "aioquic cannot sign"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "curve secp256k1"),
    (lambda: rsa.generate_private_key(65537, 1024), "RSA 1024: too short"),
    (ed448.Ed448PrivateKey.generate, "a quicmesh node cannot use"),
])
def test_issue_from_csr_refuses_keys_a_node_cannot_use(tmp_path, root, key, fragment):
    private = key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
    csr = builder.sign(private, None if isinstance(private, ed448.Ed448PrivateKey) else hashes.SHA256())
    (tmp_path / "k.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match=re.escape(fragment)):
        issue_from_csr(root, tmp_path / "k.csr", tmp_path / "out", node="n")


def test_issue_from_csr_refuses_a_tampered_csr(tmp_path, root):
    made = create_csr(tmp_path / "n", "prod", "alpha")
    der = made.csr.public_bytes(serialization.Encoding.DER)
    (tmp_path / "forged.csr").write_bytes(der.replace(b"prod/alpha", b"prod/alphb"))
    with pytest.raises(PkiError, match="signature does not verify"):
        issue_from_csr(root, tmp_path / "forged.csr", tmp_path / "out")
    (tmp_path / "junk.csr").write_bytes(der[:40])
    with pytest.raises(PkiError, match="not a certificate signing request"):
        issue_from_csr(root, tmp_path / "junk.csr", tmp_path / "out")


def test_renew_keeps_names_and_key_and_stages_beside(tmp_path, root):
    first = issue_node_cert(root, "alpha", tmp_path / "alpha", dns=["a.example"], ips=["10.0.0.1"],
                            key_type="ed25519")
    renewed = renew_node_cert(root, "alpha", tmp_path / "alpha", days=30)
    assert renewed.staged == ((tmp_path / "alpha" / "node.crt.new", tmp_path / "alpha" / "node.crt"),)
    assert renewed.cert_path == tmp_path / "alpha" / "node.crt.new" and renewed.key_path is None
    old_names = first.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert renewed.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == old_names
    assert renewed.cert.public_key() == first.cert.public_key()
    assert abs(renewed.cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)) < \
        dt.timedelta(minutes=5)
    assert _policy(root).verify(load_certificates(renewed.cert_path), expect_node="alpha").node == "alpha"
    with pytest.raises(PkiError, match="node.crt.new exists"):
        renew_node_cert(root, "alpha", tmp_path / "alpha")
    rotated = renew_node_cert(root, "alpha", tmp_path / "alpha", new_key=True, force=True)
    assert rotated.staged == () and rotated.key_path == tmp_path / "alpha" / "node.key"
    assert not (tmp_path / "alpha" / "node.crt.new").exists() and "removed" in rotated.notes[0]
    new_key_ = load_private_key(rotated.key_path)
    assert isinstance(new_key_, ed25519.Ed25519PrivateKey)  # same type as before
    assert new_key_.public_key() == load_certificates(rotated.cert_path)[0].public_key() != first.cert.public_key()


def test_renew_refuses(tmp_path, root):
    issue_node_cert(root, "alpha", tmp_path / "alpha")
    issue_node_cert(root, "beta", tmp_path / "beta")
    with pytest.raises(PkiError, match="not of quicmesh://prod/beta"):
        renew_node_cert(root, "beta", tmp_path / "alpha")
    with pytest.raises(PkiError, match="no certificate issued to node 'gamma'"):
        renew_node_cert(root, "gamma", tmp_path / "gamma")
    with pytest.raises(PkiError, match="add --new-key"):
        renew_node_cert(root, "alpha", tmp_path / "alpha", key_type="p384")
    (tmp_path / "alpha" / "node.key").write_bytes((tmp_path / "beta" / "node.key").read_bytes())
    with pytest.raises(PkiError, match="is not the key of"):
        renew_node_cert(root, "alpha", tmp_path / "alpha")
    revoke(root, "beta")
    with pytest.raises(PkiError, match="is revoked"):
        renew_node_cert(root, "beta", tmp_path / "beta", new_key=True, force=True)


def test_renew_from_the_record_picks_the_newest(tmp_path, root):
    now = dt.datetime.now(dt.timezone.utc)  # not NOW (taken at import): the CA is made now, backdated 5 min only
    issue_node_cert(root, "alpha", tmp_path / "one", dns=["old.example"], now=now)
    issue_node_cert(root, "alpha", tmp_path / "two", dns=["new.example"], now=now + dt.timedelta(minutes=1))
    renewed = renew_node_cert(root, "alpha", tmp_path / "fresh")
    names = renewed.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["new.example"]
    assert renewed.cert_path == tmp_path / "fresh" / "node.crt" and renewed.staged == ()


def test_write_node_config_never_replaces(tmp_path):
    path = tmp_path / "node.toml"
    assert write_node_config(path, b"one\n") == "written"
    assert write_node_config(path, b"one\n") == "unchanged" and not (tmp_path / "node.toml.new").exists()
    assert write_node_config(path, b"two\n") == "staged"
    assert path.read_bytes() == b"one\n" and (tmp_path / "node.toml.new").read_bytes() == b"two\n"
    assert write_node_config(path, b"three\n") == "staged"  # the .new is generated: refreshed
    assert (tmp_path / "node.toml.new").read_bytes() == b"three\n"


def test_key_type_of_round_trips():
    for key_type in ("p256", "p384", "ed25519", "rsa2048"):
        assert key_type_of(generate_key(key_type).public_key()) == key_type
    assert key_type_of(ec.generate_private_key(ec.SECP521R1()).public_key()) is None
