"""`quicmesh-pki renew`, `csr` and `sign --csr`, run as real processes on real certificates, checked by the
system `openssl` and by the TrustPolicy a node applies on every handshake."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pki_helpers import (
    OPENSSL,
    alt_names,
    assert_one_line_error,
    call_pki,
    mode,
    openssl,
    public_key_der,
    run_pki,
)

from quicmesh.protocol.identity import TrustPolicy, load_certificates, load_private_key

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed (interop needs it)")


def _ok(result) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def _openssl_accepts(ca_crt: Path, cert: Path) -> None:
    """`openssl verify` accepts ``cert`` for both TLS roles a node plays."""
    for purpose in ("sslserver", "sslclient"):
        result = openssl("verify", "-purpose", purpose, "-CAfile", ca_crt, cert)
        assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def _openssl_key_matches(key: Path, cert: Path) -> bool:
    from_key = openssl("pkey", "-in", key, "-pubout")
    from_cert = openssl("x509", "-in", cert, "-noout", "-pubkey")
    assert from_key.returncode == 0 and from_cert.returncode == 0, from_key.stderr + from_cert.stderr
    return from_key.stdout == from_cert.stdout


def _leaf(path: Path) -> x509.Certificate:
    return load_certificates(path)[0]


@pytest.fixture
def lab(tmp_path) -> Path:
    """A root CA for mesh `lab`, and node n signed with DNS and IP SANs in tmp/n."""
    _ok(run_pki("ca", "--mesh", "lab", "--out", tmp_path / "ca"))
    _ok(run_pki("sign", "n", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "n", "--dns", "n.lab.example",
                "--ip", "10.0.0.7", "--ip", "2001:db8::7"))
    return tmp_path


# --- renew --------------------------------------------------------------------------------------
def test_renew_keeps_names_and_key_writes_beside_and_openssl_verifies(lab):
    node, ca = lab / "n", lab / "ca"
    before = {name: (node / name).read_bytes() for name in ("node.key", "node.crt")}
    old = _leaf(node / "node.crt")
    out = _ok(run_pki("renew", "n", "--ca-dir", ca, "--out", node))
    assert f"wrote {node / 'node.crt.new'} beside the files in use" in out
    assert f"mv {node / 'node.crt.new'} {node / 'node.crt'}" in out
    assert {name: (node / name).read_bytes() for name in before} == before  # nothing in use was touched
    assert not (node / "node.key.new").exists()
    new = _leaf(node / "node.crt.new")
    assert alt_names(new) == alt_names(old) == ["URI:quicmesh://lab/n", "DNS:n.lab.example", "IP:10.0.0.7",
                                                "IP:2001:db8::7"]
    assert public_key_der(new) == public_key_der(old)
    assert new.serial_number != old.serial_number
    assert _openssl_key_matches(node / "node.key", node / "node.crt.new")
    _openssl_accepts(ca / "ca.crt", node / "node.crt.new")
    policy = TrustPolicy.from_files(ca / "ca.crt", "lab", ca / "crl.pem")
    assert policy.verify(load_certificates(node / "node.crt.new"), expect_node="n").node == "n"
    recorded = {path.name for path in (ca / "issued").iterdir()}
    assert f"{new.serial_number:x}.pem" in recorded and f"{old.serial_number:x}.pem" in recorded
    # a second renew does not silently replace the staged file
    assert_one_line_error(call_pki("renew", "n", "--ca-dir", ca, "--out", node), 2,
                          "node.crt.new exists", "--force")


def test_renew_new_key_in_place_with_force(lab):
    node, ca = lab / "n", lab / "ca"
    old_key = (node / "node.key").read_bytes()
    _ok(run_pki("renew", "n", "--ca-dir", ca, "--out", node))  # leaves node.crt.new behind
    result = run_pki("renew", "n", "--ca-dir", ca, "--out", node, "--new-key", "--force")
    out = _ok(result)
    assert f"wrote {node / 'node.key'} (0600) and {node / 'node.crt'}" in out
    assert "removed" in result.stderr and not (node / "node.crt.new").exists()  # the stale one would not fit
    assert (node / "node.key").read_bytes() != old_key and mode(node / "node.key") == 0o600
    assert _openssl_key_matches(node / "node.key", node / "node.crt")
    assert alt_names(_leaf(node / "node.crt"))[1:] == ["DNS:n.lab.example", "IP:10.0.0.7", "IP:2001:db8::7"]
    _openssl_accepts(ca / "ca.crt", node / "node.crt")
    verified = run_pki("verify", "--ca", ca / "ca.crt", "--crl", ca / "crl.pem", "--node", "n", node / "node.crt")
    assert verified.stdout.startswith("OK: quicmesh://lab/n")


def test_renew_new_key_staged_keeps_the_pair_in_use(lab):
    node, ca = lab / "n", lab / "ca"
    before = {name: (node / name).read_bytes() for name in ("node.key", "node.crt")}
    out = _ok(run_pki("renew", "n", "--ca-dir", ca, "--out", node, "--new-key", "--key-type", "ed25519"))
    assert f"mv {node / 'node.key.new'} {node / 'node.key'} && mv {node / 'node.crt.new'} {node / 'node.crt'}" in out
    assert {name: (node / name).read_bytes() for name in before} == before
    assert mode(node / "node.key.new") == 0o600
    assert type(load_private_key(node / "node.key.new")).__name__.startswith("Ed25519")
    assert _openssl_key_matches(node / "node.key.new", node / "node.crt.new")
    _openssl_accepts(ca / "ca.crt", node / "node.crt.new")


def test_renew_in_a_bootstrap_directory_and_not_a_revoked_node(tmp_path):
    out = tmp_path / "mesh"
    _ok(run_pki("bootstrap", "prod", "a=127.0.0.1:5001", "b=b.example:5002", "--out", out))
    _ok(run_pki("renew", "b", "--ca-dir", out / "ca"))  # no --out: the bootstrap directory's b/
    assert alt_names(_leaf(out / "b" / "node.crt.new")) == ["URI:quicmesh://prod/b", "DNS:b.example"]
    _openssl_accepts(out / "ca" / "ca.crt", out / "b" / "node.crt.new")
    _ok(run_pki("revoke", "a", "--ca-dir", out / "ca"))
    assert_one_line_error(run_pki("renew", "a", "--ca-dir", out / "ca"), 2, "is revoked")
    assert not (out / "a" / "node.crt.new").exists()


def test_renew_from_the_issued_record_needs_no_node_files(lab):
    """A node issued from a CSR: the CA host has no key; renew works from the recorded certificate."""
    out = _ok(run_pki("renew", "n", "--ca-dir", lab / "ca", "--out", lab / "fresh"))
    assert f"wrote {lab / 'fresh' / 'node.crt'}" in out
    assert sorted(path.name for path in (lab / "fresh").iterdir()) == ["node.crt"]
    assert public_key_der(_leaf(lab / "fresh" / "node.crt")) == public_key_der(_leaf(lab / "n" / "node.crt"))


@pytest.mark.parametrize("args, fragment", [
    (["renew", "ghost", "--ca-dir", "{ca}", "--out", "{tmp}/ghost"], "no certificate issued to node 'ghost'"),
    (["renew", "ghost", "--ca-dir", "{ca}"], "--out DIR"),
    (["renew", "m", "--ca-dir", "{ca}", "--out", "{tmp}/n"], "is the certificate of quicmesh://lab/n, not of"),
    (["renew", "n", "--ca-dir", "{ca}", "--out", "{tmp}/n", "--key-type", "p384"], "add --new-key"),
    (["renew", "n", "--ca-dir", "{ca}", "--out", "{tmp}/n", "--new-key", "--key-type", "p521"],
     "aioquic cannot sign"),
    (["renew", "n", "--ca-dir", "{ca}", "--out", "{tmp}/n", "--days", "0"], "days must be between"),
    (["renew", "n", "--ca-dir", "{tmp}/nowhere", "--out", "{tmp}/n"], "no CA in"),
    (["renew", "Bad_Name", "--ca-dir", "{ca}", "--out", "{tmp}/n"], "invalid node name"),
    (["renew", "n", "--ca-dir", "{ca}", "--out", "{tmp}/wrongkey"], "is not the key of"),
])
def test_renew_mistakes_are_one_line_errors(lab, args, fragment):
    (lab / "wrongkey").mkdir()
    (lab / "wrongkey" / "node.crt").write_bytes((lab / "n" / "node.crt").read_bytes())
    _ok(call_pki("csr", "--mesh", "lab", "--node", "n", "--out", lab / "other"))
    (lab / "wrongkey" / "node.key").write_bytes((lab / "other" / "node.key").read_bytes())
    assert_one_line_error(call_pki(*(arg.format(tmp=lab, ca=lab / "ca") for arg in args)), 2, fragment)


# --- csr and sign --csr -------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_csr_then_sign_round_trip(tmp_path, key_type):
    node_host, ca_host = tmp_path / "node-host", tmp_path / "ca-host"
    _ok(run_pki("ca", "--mesh", "prod", "--out", ca_host / "ca"))
    out = _ok(run_pki("csr", "--mesh", "prod", "--node", "alpha", "--dns", "alpha.example", "--ip", "10.0.0.1",
                      "--out", node_host, *(["--key-type", key_type] if key_type != "p256" else [])))
    assert "request for quicmesh://prod/alpha" in out
    assert mode(node_host / "node.key") == 0o600 and mode(node_host / "node.csr") == 0o644
    checked = openssl("req", "-in", node_host / "node.csr", "-noout", "-verify")
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked.stderr
    # only the CSR travels to the CA host
    (ca_host / "alpha.csr").write_bytes((node_host / "node.csr").read_bytes())
    _ok(run_pki("sign", "--csr", ca_host / "alpha.csr", "--ca-dir", ca_host / "ca", "--out", ca_host / "alpha"))
    assert sorted(path.name for path in (ca_host / "alpha").iterdir()) == ["node.crt"]
    (node_host / "node.crt").write_bytes((ca_host / "alpha" / "node.crt").read_bytes())
    (node_host / "ca.crt").write_bytes((ca_host / "ca" / "ca.crt").read_bytes())

    cert = _leaf(node_host / "node.crt")
    assert alt_names(cert) == ["URI:quicmesh://prod/alpha", "DNS:alpha.example", "IP:10.0.0.1"]
    assert public_key_der(cert) == public_key_der(load_private_key(node_host / "node.key"))
    assert _openssl_key_matches(node_host / "node.key", node_host / "node.crt")
    _openssl_accepts(node_host / "ca.crt", node_host / "node.crt")
    policy = TrustPolicy.from_files(node_host / "ca.crt", "prod", ca_host / "ca" / "crl.pem")
    assert policy.verify(load_certificates(node_host / "node.crt"), expect_node="alpha").uri == \
        "quicmesh://prod/alpha"
    # recorded like any issued certificate: revoke finds it by name
    revoked = _ok(run_pki("revoke", "alpha", "--ca-dir", ca_host / "ca"))
    assert "revoked: node certificate quicmesh://prod/alpha" in revoked


def test_sign_csr_from_plain_openssl_takes_the_node_argument(tmp_path):
    """A CSR with no quicmesh URI (made with plain openssl): the NODE argument names it; without it, refused."""
    _ok(call_pki("ca", "--mesh", "prod", "--out", tmp_path / "ca"))
    made = openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-keyout", tmp_path / "k.pem", "-subj", "/CN=whatever", "-addext", "subjectAltName=DNS:b.example",
                   "-out", tmp_path / "plain.csr")
    assert made.returncode == 0, made.stderr
    assert_one_line_error(call_pki("sign", "--csr", tmp_path / "plain.csr", "--ca-dir", tmp_path / "ca",
                                   "--out", tmp_path / "b"), 2, "names no quicmesh://", "give the node name")
    _ok(run_pki("sign", "b", "--csr", tmp_path / "plain.csr", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "b",
                "--ip", "10.0.0.2"))
    cert = _leaf(tmp_path / "b" / "node.crt")
    assert alt_names(cert) == ["URI:quicmesh://prod/b", "DNS:b.example", "IP:10.0.0.2"]
    assert cert.subject.rfc4514_string() == "CN=b"  # the CA's subject, not the CSR's
    _openssl_accepts(tmp_path / "ca" / "ca.crt", tmp_path / "b" / "node.crt")


def test_sign_csr_refuses_another_mesh_or_node(tmp_path):
    _ok(call_pki("ca", "--mesh", "prod", "--out", tmp_path / "ca"))
    _ok(call_pki("csr", "--mesh", "staging", "--node", "alpha", "--out", tmp_path / "staging"))
    _ok(call_pki("csr", "--mesh", "prod", "--node", "beta", "--out", tmp_path / "beta"))
    other_mesh = run_pki("sign", "--csr", tmp_path / "staging" / "node.csr", "--ca-dir", tmp_path / "ca",
                         "--out", tmp_path / "x")
    assert_one_line_error(other_mesh, 2, "asks for quicmesh://staging/alpha", "serves mesh 'prod'")
    other_node = run_pki("sign", "alpha", "--csr", tmp_path / "beta" / "node.csr", "--ca-dir", tmp_path / "ca",
                         "--out", tmp_path / "x")
    assert_one_line_error(other_node, 2, "asks for quicmesh://prod/beta, not for node 'alpha'")
    assert not (tmp_path / "x" / "node.crt").exists() and not list((tmp_path / "ca" / "issued").iterdir())


def test_sign_csr_refuses_a_bad_signature(tmp_path):
    """A CSR whose identity was edited after signing (alpha -> alphb) is refused, not issued."""
    _ok(call_pki("ca", "--mesh", "prod", "--out", tmp_path / "ca"))
    _ok(call_pki("csr", "--mesh", "prod", "--node", "alpha", "--out", tmp_path / "n"))
    der = x509.load_pem_x509_csr((tmp_path / "n" / "node.csr").read_bytes()).public_bytes(Encoding.DER)
    assert der.count(b"quicmesh://prod/alpha") == 1
    (tmp_path / "forged.csr").write_bytes(der.replace(b"quicmesh://prod/alpha", b"quicmesh://prod/alphb"))
    forged = openssl("req", "-in", tmp_path / "forged.csr", "-inform", "DER", "-noout", "-verify")
    assert forged.returncode != 0 or "verify failure" in forged.stdout + forged.stderr  # openssl agrees it is bad
    result = run_pki("sign", "--csr", tmp_path / "forged.csr", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "x")
    assert_one_line_error(result, 2, "signature does not verify")
    assert not (tmp_path / "x" / "node.crt").exists()


def test_sign_csr_never_makes_a_ca(tmp_path):
    """A CSR asking for CA:TRUE, keyCertSign and codeSigning gets the CA's node policy, and a warning."""
    _ok(call_pki("ca", "--mesh", "prod", "--out", tmp_path / "ca"))
    made = openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-keyout", tmp_path / "evil.key", "-subj", "/CN=evil CA",
                   "-addext", "basicConstraints=critical,CA:TRUE",
                   "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                   "-addext", "extendedKeyUsage=codeSigning",
                   "-addext", "subjectAltName=URI:quicmesh://prod/evil",
                   "-out", tmp_path / "evil.csr")
    assert made.returncode == 0, made.stderr
    result = run_pki("sign", "--csr", tmp_path / "evil.csr", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "evil")
    _ok(result)
    assert "warning: ignored" in result.stderr and "basicConstraints CA:TRUE" in result.stderr
    cert = _leaf(tmp_path / "evil" / "node.crt")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    ekus = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert [oid.dotted_string for oid in ekus] == ["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"]
    text = openssl("x509", "-in", tmp_path / "evil" / "node.crt", "-noout", "-text").stdout
    assert "CA:FALSE" in text and "Code Signing" not in text and "Certificate Sign" not in text
    # and openssl refuses it as an issuer: a certificate "signed" by it does not verify
    child = openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", tmp_path / "child.key", "-subj", "/CN=child", "-CA", tmp_path / "evil" / "node.crt",
                    "-CAkey", tmp_path / "evil.key", "-out", tmp_path / "child.crt")
    if child.returncode == 0:  # `req -CA` needs OpenSSL 3.0+
        (tmp_path / "untrusted.pem").write_bytes((tmp_path / "evil" / "node.crt").read_bytes())
        refused = openssl("verify", "-CAfile", tmp_path / "ca" / "ca.crt", "-untrusted", tmp_path / "untrusted.pem",
                          tmp_path / "child.crt")
        assert refused.returncode != 0


@pytest.mark.parametrize("args, fragment", [
    (["sign", "--csr", "{tmp}/garbage.csr", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "not a certificate signing"),
    (["sign", "--csr", "{tmp}/absent.csr", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "No such file"),
    (["sign", "--csr", "{tmp}/cert.pem", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "not a certificate signing"),
    (["sign", "--csr", "{tmp}/n/node.csr", "--ca-dir", "{ca}", "--out", "{tmp}/x", "--key-type", "p384"],
     "--key-type does not apply to --csr"),
    (["sign", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "needs the node name"),
    (["sign", "--csr", "{tmp}/p521.csr", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "aioquic cannot sign"),
    (["sign", "--csr", "{tmp}/email.csr", "--ca-dir", "{ca}", "--out", "{tmp}/x"], "email:"),
    (["sign", "--csr", "{tmp}/n/node.csr", "--ca-dir", "{ca}", "--out", "{tmp}/n"], "is not the key of"),
    (["sign", "--csr", "{tmp}/n/node.csr", "--ca-dir", "{ca}", "--out", "{tmp}/done"], "exists; use --force"),
    (["csr", "--mesh", "lab", "--node", "n", "--out", "{tmp}/n"], "node.key exists; use --force"),
    (["csr", "--mesh", "Lab", "--node", "n", "--out", "{tmp}/y"], "invalid mesh name"),
    (["csr", "--mesh", "lab", "--node", "n", "--out", "{tmp}/y", "--ip", "10.0.0"], "invalid IP address"),
    (["csr", "--mesh", "lab", "--node", "n", "--out", "{tmp}/y", "--dns", "a_b"], "invalid DNS name"),
    (["csr", "--mesh", "lab", "--node", "n", "--out", "{tmp}/y", "--key-type", "p521"], "aioquic cannot sign"),
    (["csr", "--mesh", "lab", "--node", "n", "--out", "{tmp}/y", "--key", "{tmp}/garbage.csr"], "not a PEM private"),
    (["csr", "--node", "n", "--out", "{tmp}/y"], "--mesh"),
])
def test_csr_mistakes_are_one_line_errors(tmp_path, args, fragment):
    _ok(call_pki("ca", "--mesh", "lab", "--out", tmp_path / "ca"))
    _ok(call_pki("csr", "--mesh", "lab", "--node", "n", "--out", tmp_path / "n"))
    _ok(call_pki("sign", "--csr", tmp_path / "n" / "node.csr", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "done"))
    (tmp_path / "n" / "node.key").write_bytes((tmp_path / "ca" / "ca.key").read_bytes())  # some other key
    (tmp_path / "garbage.csr").write_text("hello\n")
    (tmp_path / "cert.pem").write_bytes((tmp_path / "ca" / "ca.crt").read_bytes())
    for name, options in (("p521", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp521r1"]),
                          ("email", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                     "-addext", "subjectAltName=email:n@lab.example"])):
        made = openssl("req", "-new", *options, "-nodes", "-keyout", tmp_path / f"{name}.key", "-subj", "/CN=n",
                       "-out", tmp_path / f"{name}.csr")
        assert made.returncode == 0, made.stderr
    assert_one_line_error(call_pki(*(arg.format(tmp=tmp_path, ca=tmp_path / "ca") for arg in args)), 2, fragment)


def test_csr_for_an_existing_key(tmp_path):
    """`csr --key FILE`: a request for the key in use (renewal through a CA that never had it)."""
    _ok(call_pki("ca", "--mesh", "lab", "--out", tmp_path / "ca"))
    _ok(call_pki("sign", "n", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "n"))
    key_before = (tmp_path / "n" / "node.key").read_bytes()
    out = _ok(run_pki("csr", "--mesh", "lab", "--node", "n", "--key", tmp_path / "n" / "node.key",
                      "--out", tmp_path / "n"))
    assert f"wrote {tmp_path / 'n' / 'node.csr'} (for the key in" in out
    assert (tmp_path / "n" / "node.key").read_bytes() == key_before
    _ok(run_pki("sign", "--csr", tmp_path / "n" / "node.csr", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "n",
                "--force"))
    assert _openssl_key_matches(tmp_path / "n" / "node.key", tmp_path / "n" / "node.crt")
    _openssl_accepts(tmp_path / "ca" / "ca.crt", tmp_path / "n" / "node.crt")
