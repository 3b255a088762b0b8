"""The mesh CA: create a root or intermediate CA, issue node certificates, revoke them with a CRL.

Everything quicmesh-pki writes is standard X.509 that `openssl verify` accepts, and satisfies the identity
rules of quicmesh.protocol.identity: a CA records its mesh as the URI SAN ``quicmesh://<mesh>``; a node
certificate carries ``quicmesh://<mesh>/<node>``, EKU serverAuth + clientAuth, critical KU
digitalSignature, CA:FALSE, and never outlives its issuer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from quicmesh.errors import IdentityError
from quicmesh.protocol.dates import as_utc, format_utc
from quicmesh.protocol.fingerprints import normalize_fingerprint
from quicmesh.protocol.identity import (
    ca_mesh,
    certificate_label,
    fingerprint,
    identity_of,
    identity_uri,
    is_ca_certificate,
    load_certificates,
    load_crl,
    load_private_key,
    mesh_uri,
)
from quicmesh.protocol.names import is_valid_name, validate_name

from pki import PkiError
from pki.defaults import (
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    DEFAULT_INTERMEDIATE_DAYS,
    DEFAULT_KEY_TYPE,
    DEFAULT_NODE_DAYS,
    KEY_TYPES,
    MAX_DAYS,
)
from pki.files import PUBLIC_MODE, SECRET_MODE, make_private_dir, refuse_existing, write_file
from pki.layout import (
    CA_CERT,
    CA_CHAIN,
    CA_KEY,
    CRL,
    ISSUED,
    NODE_CERT,
    NODE_KEY,
    refresh_crl_copies,
)

BACKDATE = dt.timedelta(minutes=5)
"""Certificates start a little in the past, so a peer whose clock lags slightly still accepts them."""

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Issued:
    """A certificate just issued: where it and its key were written, and what the operator should know."""

    cert: x509.Certificate
    cert_path: Path
    key_path: Path | None
    """None when no key was written (`sign --csr`, `renew` without --new-key): the key stays where it is."""
    notes: tuple[str, ...] = ()
    staged: tuple[tuple[Path, Path], ...] = ()
    """(written, in use) pairs when `renew` wrote beside files it does not replace without --force."""


@dataclass(frozen=True)
class CrlUpdate:
    """A CRL just written: the certificates it newly revokes, and the node copies refreshed with it."""

    crl: x509.CertificateRevocationList
    path: Path
    revoked: tuple[x509.Certificate, ...]
    already_revoked: tuple[x509.Certificate, ...]
    refreshed: tuple[Path, ...]


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA directory opened for use; ``key`` is None when opened only to read it."""

    directory: Path
    cert: x509.Certificate
    mesh: str
    chain: tuple[x509.Certificate, ...]
    """What a node certificate issued here is followed by in node.crt: () for a root."""
    key: PrivateKeyTypes | None = None

    @classmethod
    def open(cls, directory: Path | str, passphrase: bytes | None = None, *, with_key: bool = True
             ) -> CertificateAuthority:
        """Load ca.crt (and chain.pem, and ca.key unless ``with_key`` is False) from a CA directory."""
        directory = Path(directory)
        cert_path = directory / CA_CERT
        if not cert_path.exists():
            raise PkiError(f"no CA in {directory}: {cert_path} is missing (create one with `quicmesh-pki ca`)")
        cert = load_certificates(cert_path)[0]
        mesh = ca_mesh(cert)
        if not is_ca_certificate(cert) or mesh is None:
            raise PkiError(f"{cert_path} is not a CA certificate made by quicmesh-pki "
                           "(it needs CA:TRUE and a quicmesh://<mesh> URI SAN naming its mesh)")
        chain_path = directory / CA_CHAIN
        chain = tuple(load_certificates(chain_path)) if chain_path.exists() else ()
        key = None
        if with_key:
            key = load_private_key(directory / CA_KEY, passphrase)
            if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
                raise PkiError(f"{directory / CA_KEY} is not the key of {cert_path}")
        return cls(directory, cert, mesh, chain, key)

    def signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        if self.key is None:
            raise PkiError(f"the CA key of {self.directory} was not loaded")
        return self.key  # type: ignore[return-value]


# --- keys ---------------------------------------------------------------------------------------
def check_key_type(key_type: str) -> str:
    """``key_type`` if quicmesh-pki can make such keys, else a PkiError listing the choices."""
    if key_type in KEY_TYPES:
        return key_type
    choices = f"use {', '.join(KEY_TYPES)} (default {DEFAULT_KEY_TYPE})"
    if str(key_type).lower() in ("p521", "p-521", "secp521r1"):
        raise PkiError(f"key type {key_type!r} is not supported: aioquic cannot sign TLS handshakes with "
                       f"ECDSA P-521; {choices}")
    raise PkiError(f"unknown key type {key_type!r}: {choices}")


def generate_key(key_type: str) -> PrivateKeyTypes:
    """A new private key of a type aioquic can sign TLS 1.3 handshakes with."""
    check_key_type(key_type)
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_pem(key: PrivateKeyTypes, passphrase: bytes | None) -> bytes:
    if passphrase is not None and not passphrase:
        raise PkiError("the passphrase is empty")
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def signature_hash(key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
    """The hash to sign with: none for EdDSA (built in), SHA-384 to match a P-384 key, else SHA-256."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def public_key_der(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


# --- certificates -------------------------------------------------------------------------------
def create_root_ca(directory: Path | str, mesh: str, *, key_type: str = DEFAULT_KEY_TYPE,
                   days: int = DEFAULT_CA_DAYS, passphrase: bytes | None = None, force: bool = False,
                   now: dt.datetime | None = None) -> Issued:
    """Create a self-signed CA for ``mesh`` in ``directory`` (ca.key, ca.crt, an empty crl.pem)."""
    mesh = validate_name(mesh, "mesh")
    check_key_type(key_type)
    now = as_utc(now)
    not_before, not_after, notes = validity(None, days, now)
    key = generate_key(key_type)
    cert = _sign(subject=_ca_subject(mesh, "root", key), public_key=key.public_key(), issuer=None,
                 signing_key=key, not_before=not_before, not_after=not_after,
                 extensions=_ca_extensions(mesh, path_length=None))
    return _write_ca(Path(directory), mesh, cert, key, (), passphrase=passphrase, force=force, now=now, notes=notes)


def create_intermediate_ca(directory: Path | str, issuer: CertificateAuthority, *,
                           key_type: str = DEFAULT_KEY_TYPE, days: int = DEFAULT_INTERMEDIATE_DAYS,
                           passphrase: bytes | None = None, force: bool = False,
                           now: dt.datetime | None = None) -> Issued:
    """Create a CA signed by ``issuer`` that may issue node certificates only (pathLenConstraint 0)."""
    directory = Path(directory)
    if directory.resolve() == issuer.directory.resolve():
        raise PkiError("the intermediate CA needs its own directory, not the issuer's")
    issuer_constraints = issuer.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if issuer_constraints.path_length == 0:
        raise PkiError(f"the CA in {issuer.directory} may not issue CA certificates (pathLenConstraint 0)")
    check_key_type(key_type)
    now = as_utc(now)
    not_before, not_after, notes = validity(issuer, days, now)
    key = generate_key(key_type)
    cert = _sign(subject=_ca_subject(issuer.mesh, "intermediate", key), public_key=key.public_key(),
                 issuer=issuer, signing_key=issuer.signing_key(), not_before=not_before, not_after=not_after,
                 extensions=_ca_extensions(issuer.mesh, path_length=0))
    issued = _write_ca(directory, issuer.mesh, cert, key, (cert, *issuer.chain), passphrase=passphrase, force=force,
                       now=now, notes=notes)
    record_issued(issuer, cert)
    return issued


def issue_node_cert(ca: CertificateAuthority, node: str, out_dir: Path | str, *, dns: Sequence[str] = (),
                    ips: Sequence[str] = (), days: int = DEFAULT_NODE_DAYS, key_type: str = DEFAULT_KEY_TYPE,
                    force: bool = False, now: dt.datetime | None = None) -> Issued:
    """Write out_dir/node.key (0600) and out_dir/node.crt (leaf, then the CA's intermediates)."""
    node = validate_name(node, "node")
    check_key_type(key_type)
    alt_names = node_alt_names(ca.mesh, node, [normalize_dns_name(name) for name in dns],
                                [parse_ip_address(address) for address in ips])
    now = as_utc(now)
    not_before, not_after, notes = validity(ca, days, now)
    out_dir = make_private_dir(Path(out_dir))
    key_path, cert_path = out_dir / NODE_KEY, out_dir / NODE_CERT
    refuse_existing([key_path, cert_path], force)
    key = generate_key(key_type)
    cert = sign_node_cert(ca, node, key.public_key(), alt_names, not_before, not_after)
    write_file(key_path, key_pem(key, None), SECRET_MODE, replace=force)
    write_file(cert_path, pem(cert, *ca.chain), PUBLIC_MODE, replace=force)
    record_issued(ca, cert)
    return Issued(cert, cert_path, key_path, tuple(notes))


def node_alt_names(mesh: str, node: str, dns: Sequence[str],
                    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> list[x509.GeneralName]:
    """The SANs of a node certificate: its identity URI first, then DNS names and IP addresses, deduplicated."""
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(mesh, node))]
    alt_names += [x509.DNSName(name) for name in dict.fromkeys(dns)]
    alt_names += [x509.IPAddress(address) for address in dict.fromkeys(ips)]
    return alt_names


def sign_node_cert(ca: CertificateAuthority, node: str, public_key: object, alt_names: list[x509.GeneralName],
                    not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    """A node certificate by the CA's policy alone: nothing of a request is copied but the key and names."""
    return _sign(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]), public_key=public_key,
        issuer=ca, signing_key=ca.signing_key(), not_before=not_before, not_after=not_after,
        extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(digital_signature=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.SubjectAlternativeName(alt_names), False),
        ])


def _write_ca(directory: Path, mesh: str, cert: x509.Certificate, key: PrivateKeyTypes,
              chain: tuple[x509.Certificate, ...], *, passphrase: bytes | None, force: bool, now: dt.datetime,
              notes: list[str]) -> Issued:
    make_private_dir(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    refuse_existing([key_path, cert_path], force)
    write_file(key_path, key_pem(key, passphrase), SECRET_MODE, replace=force)
    write_file(cert_path, pem(cert), PUBLIC_MODE, replace=force)
    if chain:
        write_file(directory / CA_CHAIN, pem(*chain), PUBLIC_MODE, replace=True)
    else:
        (directory / CA_CHAIN).unlink(missing_ok=True)  # a root replacing an intermediate (--force)
    make_private_dir(directory / ISSUED)
    ca = CertificateAuthority(directory, cert, mesh, chain, key)
    _write_crl(ca, [], number=1, now=now, days=DEFAULT_CRL_DAYS)
    return Issued(cert, cert_path, key_path, tuple(notes))


def _sign(*, subject: x509.Name, public_key: object, issuer: CertificateAuthority | None,
          signing_key: PrivateKeyTypes, not_before: dt.datetime, not_after: dt.datetime,
          extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(public_key)  # type: ignore[arg-type]
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                              critical=False))
    if issuer is not None:
        builder = builder.add_extension(_authority_key_id(issuer.cert), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, signature_hash(signing_key))  # type: ignore[arg-type]


def validity(issuer: CertificateAuthority | None, days: int, now: dt.datetime
              ) -> tuple[dt.datetime, dt.datetime, list[str]]:
    """(not_before, not_after, notes): ``days`` from now, but never outside the issuer's own validity."""
    if not 1 <= days <= MAX_DAYS:
        raise PkiError(f"days must be between 1 and {MAX_DAYS}, got {days}")
    not_before, not_after, notes = now - BACKDATE, now + dt.timedelta(days=days), []
    if issuer is not None:
        issuer_start, issuer_end = issuer.cert.not_valid_before_utc, issuer.cert.not_valid_after_utc
        if issuer_end <= now:
            raise PkiError(f"the CA in {issuer.directory} expired on {format_utc(issuer_end)}: it cannot issue")
        if issuer_start > now:
            raise PkiError(f"the CA in {issuer.directory} is not valid before {format_utc(issuer_start)}: "
                           "it cannot issue yet")
        if not_after > issuer_end:
            not_after = issuer_end
            notes.append(f"validity clipped to the issuing CA's expiry, {format_utc(issuer_end)} "
                         f"({(issuer_end - now).days} days instead of {days})")
        not_before = max(not_before, issuer_start)
    return not_before, not_after, notes


def _ca_subject(mesh: str, role: str, key: PrivateKeyTypes) -> x509.Name:
    """``quicmesh <mesh> <role> CA <key id>``: the key id tells apart CAs re-created under the same mesh."""
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest[:3].hex()  # type: ignore[arg-type]
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "quicmesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"quicmesh {mesh} {role} CA {key_id}"),
    ])


def _ca_extensions(mesh: str, path_length: int | None) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=True, path_length=path_length), True),
        (_key_usage(key_cert_sign=True, crl_sign=True), True),
        (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(mesh_uri(mesh))]), False),
    ]


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
               ) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def normalize_dns_name(name: str) -> str:
    """A DNS name for a SAN, lower case; PkiError if it is not one."""
    lowered = name.lower().rstrip(".")
    if len(lowered) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in lowered.split(".")):
        raise PkiError(f"invalid DNS name {name!r}: dot-separated labels of a-z, 0-9 and '-'")
    return lowered


def parse_ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address for a SAN; PkiError if ``text`` is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise PkiError(f"invalid IP address {text!r}") from None


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


# --- the issued-certificate record and revocation -----------------------------------------------
def record_issued(ca: CertificateAuthority, cert: x509.Certificate) -> None:
    """Keep a copy of every certificate ``ca`` issues, so that `revoke NODE` can find it later."""
    issued_dir = make_private_dir(ca.directory / ISSUED)
    write_file(issued_dir / f"{cert.serial_number:x}.pem", pem(cert), PUBLIC_MODE, replace=False)


def issued_certificates(ca: CertificateAuthority) -> list[x509.Certificate]:
    """Every certificate recorded as issued by ``ca`` (records of a CA it replaced with --force are skipped)."""
    recorded = [load_certificates(path)[0] for path in sorted((ca.directory / ISSUED).glob("*.pem"))]
    return [cert for cert in recorded if issued_by(cert, ca.cert)]


def select_for_revocation(ca: CertificateAuthority, target: str | None, cert_file: Path | str | None = None
                          ) -> list[x509.Certificate]:
    """The certificates ``target`` designates: every one issued to a node name, or the one of a fingerprint.

    ``cert_file`` gives the certificate directly (one issued before records were kept, or elsewhere);
    with a ``target`` too, both must agree.
    """
    if cert_file is not None:
        cert = load_certificates(cert_file)[0]
        if target is not None and not _designates(target, cert):
            raise PkiError(f"{cert_file} holds the {certificate_label(cert)}, not {target}")
        return [cert]
    if target is None:
        raise PkiError("say what to revoke: a node name, a sha256 fingerprint, or --cert FILE")
    issued = issued_certificates(ca)
    found = [cert for cert in issued if _designates(target, cert)]
    if found:
        return found
    where = ca.directory / ISSUED
    if is_valid_name(target):
        known = sorted({name for name in map(node_name, issued) if name})
        raise PkiError(f"no certificate issued to node {target!r} is recorded in {where} "
                       f"(recorded nodes: {', '.join(known) or 'none'}); use --cert FILE for one issued elsewhere")
    raise PkiError(f"no certificate with fingerprint {normalize_fingerprint(target)} is recorded in {where}; "
                   "use --cert FILE for one issued elsewhere")


def _designates(target: str, cert: x509.Certificate) -> bool:
    """Whether ``target`` (a node name or a fingerprint) names ``cert``; junk raises a PkiError."""
    if is_valid_name(target):
        return node_name(cert) == target
    try:
        return fingerprint(cert) == normalize_fingerprint(target)
    except IdentityError:
        raise PkiError(f"{target!r} is neither a node name nor a sha256 fingerprint") from None


def node_name(cert: x509.Certificate) -> str | None:
    try:
        return identity_of(cert).node
    except IdentityError:
        return None


def update_crl(ca: CertificateAuthority, revoke: Sequence[x509.Certificate] = (), *,
               now: dt.datetime | None = None, days: int = DEFAULT_CRL_DAYS) -> CrlUpdate:
    """Re-sign crl.pem with its entries plus ``revoke``, valid ``days``; refresh bootstrap node copies."""
    now = as_utc(now)
    if not 1 <= days <= MAX_DAYS:
        raise PkiError(f"CRL validity days must be between 1 and {MAX_DAYS}, got {days}")
    for cert in revoke:
        if not issued_by(cert, ca.cert):
            raise PkiError(f"the {certificate_label(cert)} was not issued by the CA in {ca.directory}")
    current = current_crl(ca)
    entries = list(current) if current is not None else []
    revoked_serials = {entry.serial_number for entry in entries}
    new = [cert for cert in revoke if cert.serial_number not in revoked_serials]
    already = [cert for cert in revoke if cert.serial_number in revoked_serials]
    entries += [x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build()
                for cert in {cert.serial_number: cert for cert in new}.values()]
    crl = _write_crl(ca, entries, number=_crl_number(current) + 1, now=now, days=days)
    return CrlUpdate(crl, ca.directory / CRL, tuple(new), tuple(already), tuple(refresh_crl_copies(ca.directory)))


def _write_crl(ca: CertificateAuthority, entries: list[x509.RevokedCertificate], *, number: int,
               now: dt.datetime, days: int) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.cert.subject)
               .last_update(now)
               .next_update(now + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(_authority_key_id(ca.cert), critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.signing_key(), signature_hash(ca.signing_key()))
    write_file(ca.directory / CRL, crl.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, replace=True)
    return crl


def current_crl(ca: CertificateAuthority) -> x509.CertificateRevocationList | None:
    path = ca.directory / CRL
    if not path.exists():
        return None
    crl = load_crl(path)
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.cert.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{path} is not signed by this CA: refusing to extend it (move it away to start afresh)")
    return crl


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def revoke(ca: CertificateAuthority, target: str | None, cert_file: Path | str | None = None, *,
           now: dt.datetime | None = None, days: int = DEFAULT_CRL_DAYS) -> CrlUpdate:
    """Add the certificates ``target`` / ``cert_file`` designate to the CA's CRL (see select_for_revocation)."""
    return update_crl(ca, select_for_revocation(ca, target, cert_file), now=now, days=days)
