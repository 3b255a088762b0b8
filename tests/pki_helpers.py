"""Shared helpers of the identity and PKI tests: a certificate factory able to make every defect, and a
runner for the real `quicmesh-pki` entry point."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
"""Start of validity of factory certificates; tests pass ``now=`` relative to it."""
DURING = T0 + dt.timedelta(days=1)
YEAR = dt.timedelta(days=365)
BOTH_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


@dataclass(frozen=True)
class Made:
    cert: x509.Certificate
    key: object

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def new_key(kind: str = "p256"):
    return {
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    }[kind]()


def _build(cn: str, key, issuer: Made | None, *, not_before: dt.datetime, not_after: dt.datetime,
           extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key()), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    signer = issuer.key if issuer else key
    return builder.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def key_usage(**flags: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def make_ca(cn: str = "Test CA", *, issuer: Made | None = None, key_type: str = "p256", key=None,
            path_length: int | None = None, not_before: dt.datetime = T0, not_after: dt.datetime = T0 + 10 * YEAR,
            usage: x509.KeyUsage | None = None, ca: bool = True, uris: list[str] = ()) -> Made:
    key = key or new_key(key_type)
    extensions = [(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True),
                  (usage or key_usage(key_cert_sign=True, crl_sign=True), True)]
    if uris:
        extensions.append((x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False))
    return Made(_build(cn, key, issuer, not_before=not_before, not_after=not_after, extensions=extensions), key)


def make_leaf(issuer: Made, node: str = "alpha", *, mesh: str = "m", uris: list[str] | None = None,
              ekus=BOTH_EKUS, usage: x509.KeyUsage | None = None, key_type: str = "p256", ca: bool = False,
              not_before: dt.datetime = T0, not_after: dt.datetime = T0 + YEAR,
              extra: list[tuple[x509.ExtensionType, bool]] = ()) -> Made:
    key = new_key(key_type)
    uris = [f"quicmesh://{mesh}/{node}"] if uris is None else uris
    extensions = [(x509.BasicConstraints(ca=ca, path_length=None), True),
                  (usage or key_usage(digital_signature=True), True)]
    if uris:
        extensions.append((x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False))
    if ekus:
        extensions.append((x509.ExtendedKeyUsage(list(ekus)), False))
    extensions += list(extra)
    return Made(_build(node, key, issuer, not_before=not_before, not_after=not_after, extensions=extensions), key)


def make_crl(issuer: Made, revoked: list[x509.Certificate], *, at: dt.datetime = DURING
             ) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
               .last_update(at).next_update(at + dt.timedelta(days=30)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(at).build())
    signer = issuer.key
    return builder.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def flip_byte(der: bytes, index: int) -> x509.Certificate:
    changed = bytearray(der)
    changed[index] ^= 0x01
    return x509.load_der_x509_certificate(bytes(changed))


def run_pki(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point (`python -m pki.cli`) as the operator would."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pki.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60)


def call_pki(*args: object) -> subprocess.CompletedProcess[str]:
    """The same entry point, ``pki.cli.main``, called in this process: for the many-case tables, where a
    subprocess per case would cost ~0.2 s each. Any escaping exception fails the test, as a traceback would."""
    from pki.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's way out
            code = exit_.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2, *fragments: str) -> None:
    """The CLI contract for mistakes: exit ``code``, one 'quicmesh-pki: error:' line, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quicmesh-pki: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


OPENSSL = shutil.which("openssl")


def openssl(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The system `openssl`, to check what quicmesh-pki writes with a tool nobody here wrote."""
    assert OPENSSL is not None, "the openssl binary is not installed"
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=30)


def public_key_der(key_or_cert) -> bytes:
    """The SubjectPublicKeyInfo of a private key, public key or certificate, to compare keys."""
    public = key_or_cert.public_key() if hasattr(key_or_cert, "public_key") else key_or_cert
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def alt_names(cert: x509.Certificate) -> list[str]:
    """A certificate's SANs as `KIND:value` strings, in order."""
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    kinds = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS", x509.IPAddress: "IP"}
    return [f"{kinds.get(type(name), type(name).__name__)}:{name.value}" for name in names]
