"""Interop with a tool nobody here wrote: the system `openssl` checks what quicmesh-pki writes, and
TrustPolicy accepts a CA and node certificate made with plain `openssl` commands."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from pki_helpers import run_pki

from pki.authority import CertificateAuthority, create_intermediate_ca, create_root_ca, issue_node_cert, revoke
from quicmesh.errors import UsageError
from quicmesh.protocol.identity import TrustPolicy, load_certificates

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed (interop needs it)")


def openssl(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=30)


@pytest.fixture
def root(tmp_path) -> CertificateAuthority:
    create_root_ca(tmp_path / "root", "prod")
    return CertificateAuthority.open(tmp_path / "root")


def _split_chain(node_crt: Path, tmp_path: Path) -> tuple[Path, Path]:
    """node.crt holds leaf + intermediates; `openssl verify` wants them in separate files."""
    leaf, *intermediates = load_certificates(node_crt)
    leaf_file, untrusted = tmp_path / "leaf.pem", tmp_path / "untrusted.pem"
    leaf_file.write_bytes(leaf.public_bytes(Encoding.PEM))
    untrusted.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in intermediates))
    return leaf_file, untrusted


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_openssl_verifies_a_root_issued_node_cert(tmp_path, key_type):
    create_root_ca(tmp_path / "root", "prod", key_type=key_type)
    issued = issue_node_cert(CertificateAuthority.open(tmp_path / "root"), "alpha", tmp_path / "alpha",
                             key_type=key_type)
    result = openssl("verify", "-purpose", "sslserver", "-CAfile", tmp_path / "root" / "ca.crt", issued.cert_path)
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr
    result = openssl("verify", "-purpose", "sslclient", "-CAfile", tmp_path / "root" / "ca.crt", issued.cert_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_openssl_verifies_an_intermediate_issued_node_cert(tmp_path, root):
    create_intermediate_ca(tmp_path / "inter", root)
    issued = issue_node_cert(CertificateAuthority.open(tmp_path / "inter"), "alpha", tmp_path / "alpha")
    leaf, untrusted = _split_chain(issued.cert_path, tmp_path)
    result = openssl("verify", "-CAfile", root.directory / "ca.crt", "-untrusted", untrusted, leaf)
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr
    missing = openssl("verify", "-CAfile", root.directory / "ca.crt", leaf)
    assert missing.returncode != 0  # and openssl agrees that the intermediate is needed


def test_openssl_reads_the_crl_and_applies_it(tmp_path, root):
    issued = issue_node_cert(root, "alpha", tmp_path / "alpha")
    revoke(root, "alpha")
    crl = root.directory / "crl.pem"
    text = openssl("crl", "-in", crl, "-noout", "-text")
    assert text.returncode == 0, text.stderr
    serials = [int(line.split(":")[1], 16) for line in text.stdout.splitlines() if "Serial Number:" in line]
    assert serials == [issued.cert.serial_number]
    assert "X509v3 CRL Number" in text.stdout
    signed = openssl("crl", "-in", crl, "-noout", "-CAfile", root.directory / "ca.crt")
    assert "verify OK" in signed.stdout + signed.stderr
    check = openssl("verify", "-crl_check", "-CAfile", root.directory / "ca.crt", "-CRLfile", crl, issued.cert_path)
    assert check.returncode != 0 and "revoked" in check.stdout + check.stderr


NODE_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {eku}
subjectAltName = URI:quicmesh://m/n, DNS:n.example
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl_pki(directory: Path, eku: str) -> Path:
    """A CA (openssl's default CA extensions) and a node certificate made with plain `openssl` commands."""
    (directory / "node.ext").write_text(NODE_EXTENSIONS.format(eku=eku))
    steps = [
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"],
        ["req", "-new", "-x509", "-key", "ca.key", "-subj", "/CN=Plain OpenSSL CA", "-days", "30", "-out", "ca.crt"],
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "node.key"],
        ["req", "-new", "-key", "node.key", "-subj", "/CN=n", "-out", "node.csr"],
        ["x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "10",
         "-sha256", "-extfile", "node.ext", "-out", "node.crt"],
    ]
    for step in steps:
        result = openssl(*step, cwd=directory)
        assert result.returncode == 0, (step, result.stderr)
    return directory / "node.crt"


def test_trust_policy_accepts_a_plain_openssl_pki(tmp_path):
    node_crt = _openssl_pki(tmp_path, "serverAuth, clientAuth")
    policy = TrustPolicy.from_files(tmp_path / "ca.crt", "m")
    assert policy.verify(load_certificates(node_crt), expect_node="n").uri == "quicmesh://m/n"
    verified = run_pki("verify", "--ca", tmp_path / "ca.crt", "--mesh", "m", node_crt)
    assert verified.returncode == 0 and verified.stdout.startswith("OK: quicmesh://m/n"), verified.stderr


def test_trust_policy_refuses_an_openssl_cert_with_server_auth_only(tmp_path):
    node_crt = _openssl_pki(tmp_path, "serverAuth")
    with pytest.raises(UsageError, match="clientAuth"):
        TrustPolicy.from_files(tmp_path / "ca.crt", "m").verify(load_certificates(node_crt))
