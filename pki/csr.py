"""Certificates for keys the CA does not make or keep: a CSR made on the node (its key never leaves it), and
renewal of an issued certificate, with the same key or a new one. The CA's own policy applies, never the CSR's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from quicmesh.errors import IdentityError
from quicmesh.protocol.dates import as_utc
from quicmesh.protocol.identity import (
    URI_PREFIX,
    NodeIdentity,
    identity_of,
    identity_uri,
    load_certificates,
    load_private_key,
    parse_identity_uri,
)
from quicmesh.protocol.names import validate_name

from pki import PkiError
from pki.authority import (
    CertificateAuthority,
    Issued,
    check_key_type,
    current_crl,
    generate_key,
    issued_by,
    issued_certificates,
    key_pem,
    node_alt_names,
    node_name,
    normalize_dns_name,
    parse_ip_address,
    pem,
    public_key_der,
    record_issued,
    sign_node_cert,
    signature_hash,
    validity,
)
from pki.defaults import DEFAULT_KEY_TYPE, DEFAULT_NODE_DAYS
from pki.files import PUBLIC_MODE, SECRET_MODE, make_private_dir, refuse_existing, write_file
from pki.layout import ISSUED, NODE_CERT, NODE_CSR, NODE_KEY, STAGED_SUFFIX


@dataclass(frozen=True)
class CsrMade:
    """A certificate signing request just written on a node, and its key (which never leaves the node)."""

    csr: x509.CertificateSigningRequest
    csr_path: Path
    key_path: Path | None
    """None when the CSR was made for an existing key (``key_file``), which is left where it is."""
    identity: str


def check_public_key(public_key: object, what: str) -> None:
    """PkiError unless ``public_key`` is one aioquic can use for a TLS 1.3 handshake (a node's key)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name in ("secp256r1", "secp384r1"):
            return
        if public_key.curve.name == "secp521r1":
            raise PkiError(f"{what} is ECDSA P-521, which aioquic cannot sign TLS handshakes with; "
                           "use a P-256, P-384, Ed25519 or RSA (2048+) key")
        raise PkiError(f"{what} is ECDSA on curve {public_key.curve.name}; use a P-256, P-384, Ed25519 or "
                       "RSA (2048+) key")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= 2048:
            return
        raise PkiError(f"{what} is RSA {public_key.key_size}: too short; use 2048 bits or more")
    raise PkiError(f"{what} is a {type(public_key).__name__.removeprefix('_')}, which a quicmesh node cannot use; "
                   "use a P-256, P-384, Ed25519 or RSA (2048+) key")


def key_type_of(public_key: object) -> str | None:
    """The KEY_TYPES name of ``public_key``, or None if quicmesh-pki does not make such keys."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "p256", "secp384r1": "p384"}.get(public_key.curve.name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 2048:
        return "rsa2048"
    return None


def create_csr(out_dir: Path | str, mesh: str, node: str, *, dns: Sequence[str] = (), ips: Sequence[str] = (),
               key_type: str = DEFAULT_KEY_TYPE, key_file: Path | str | None = None,
               force: bool = False) -> CsrMade:
    """On the node: write out_dir/node.key (0600, unless ``key_file`` names an existing key) and
    out_dir/node.csr asking for ``quicmesh://<mesh>/<node>`` plus DNS/IP SANs. Only the CSR goes to the CA."""
    mesh, node = validate_name(mesh, "mesh"), validate_name(node, "node")
    check_key_type(key_type)
    alt_names = node_alt_names(mesh, node, [normalize_dns_name(name) for name in dns],
                                [parse_ip_address(address) for address in ips])
    out_dir = make_private_dir(Path(out_dir))
    key_path: Path | None = out_dir / NODE_KEY
    csr_path = out_dir / NODE_CSR
    if key_file is not None:
        key = load_private_key(key_file)
        check_public_key(key.public_key(), f"the key in {key_file}")
        key_path = None  # an existing key (e.g. the one in use, to renew through the CA): left where it is
        refuse_existing([csr_path], force)
    else:
        refuse_existing([out_dir / NODE_KEY, csr_path], force)
        key = generate_key(key_type)
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
               .add_extension(x509.SubjectAlternativeName(alt_names), critical=False))
    csr = builder.sign(key, signature_hash(key))  # type: ignore[arg-type]
    if key_path is not None:
        write_file(key_path, key_pem(key, None), SECRET_MODE, replace=force)
    write_file(csr_path, csr.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, replace=force)
    return CsrMade(csr, csr_path, key_path, identity_uri(mesh, node))


def load_csr(source: Path | str) -> x509.CertificateSigningRequest:
    """A certificate signing request from a PEM or DER file; PkiError saying why not."""
    data = Path(source).read_bytes()
    try:
        if b"-----BEGIN" in data:
            if b"CERTIFICATE REQUEST-----" not in data:
                raise ValueError("no PEM CERTIFICATE REQUEST block")
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{source}: not a certificate signing request (PEM or DER): {exc}") from None


@dataclass(frozen=True)
class _CsrRequest:
    """What a CSR asks for that the CA is willing to consider: a quicmesh identity, DNS and IP names."""

    identity: NodeIdentity | None
    dns: list[str]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ignored: list[str]


def _read_csr_request(csr: x509.CertificateSigningRequest, origin: str) -> _CsrRequest:
    """The names a CSR asks for; any extension other than its SANs is listed in ``ignored``."""
    try:
        extensions = list(csr.extensions)
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise PkiError(f"{origin}: the CSR's extensions are malformed ({exc})") from None
    identity, dns, ips, ignored = None, [], [], []
    for extension in extensions:
        value = extension.value
        if not isinstance(value, x509.SubjectAlternativeName):
            ignored.append(_describe_extension(extension))
            continue
        for name in value:
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(URI_PREFIX):
                try:
                    found = parse_identity_uri(name.value)
                except IdentityError as exc:
                    raise PkiError(f"{origin}: {exc}") from None
                if identity is not None and found != identity:
                    raise PkiError(f"{origin}: the CSR names two identities, {identity.uri} and {found.uri}: "
                                   "a node certificate has exactly one")
                identity = found
            elif isinstance(name, x509.DNSName):
                dns.append(normalize_dns_name(name.value))
            elif isinstance(name, x509.IPAddress) and isinstance(
                    name.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                ips.append(name.value)
            else:
                raise PkiError(f"{origin}: the CSR asks for the name {_describe_name(name)}, which a quicmesh node "
                               f"certificate does not carry (only its {URI_PREFIX}<mesh>/<node> URI, DNS names "
                               "and IP addresses)")
    return _CsrRequest(identity, dns, ips, ignored)


def _describe_extension(extension: x509.Extension[x509.ExtensionType]) -> str:
    value = extension.value
    if isinstance(value, x509.BasicConstraints):
        return f"basicConstraints CA:{'TRUE' if value.ca else 'FALSE'}"
    if isinstance(value, x509.UnrecognizedExtension):
        return f"extension {extension.oid.dotted_string}"
    return type(value).__name__[:1].lower() + type(value).__name__[1:]


def _describe_name(name: x509.GeneralName) -> str:
    kinds = {x509.RFC822Name: "email", x509.UniformResourceIdentifier: "URI", x509.RegisteredID: "RID",
             x509.DirectoryName: "dirName", x509.OtherName: "otherName", x509.IPAddress: "IP"}
    kind = kinds.get(type(name), type(name).__name__)
    value = name.type_id.dotted_string if isinstance(name, x509.OtherName) else name.value
    return f"{kind}:{value}"


def issue_from_csr(ca: CertificateAuthority, csr_file: Path | str, out_dir: Path | str, *, node: str | None = None,
                   dns: Sequence[str] = (), ips: Sequence[str] = (), days: int = DEFAULT_NODE_DAYS,
                   force: bool = False, now: dt.datetime | None = None) -> Issued:
    """On the CA host: check a node's CSR and write out_dir/node.crt for its key (the key never travels).

    The identity comes from the CSR's ``quicmesh://<mesh>/<node>`` URI SAN or from ``node`` (both given: they
    must agree; the mesh must be the CA's). The certificate follows the CA's policy like `sign`: CA:FALSE, KU
    digitalSignature, EKU serverAuth + clientAuth, the CA's validity rules. Of the CSR only the public key and
    the DNS/IP names are used; every other requested extension (CA:TRUE, key usages...) is ignored, with a note.
    """
    origin = str(csr_file)
    csr = load_csr(csr_file)
    try:
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{origin}: cannot check the CSR's signature ({exc})") from None
    if not signature_ok:
        raise PkiError(f"{origin}: the CSR's signature does not verify: it was altered, or not signed by the key "
                       "it holds")
    check_public_key(public_key, f"the key of {origin}")
    request = _read_csr_request(csr, origin)
    if node is not None:
        node = validate_name(node, "node")
    if request.identity is not None:
        if request.identity.mesh != ca.mesh:
            raise PkiError(f"{origin} asks for {request.identity.uri}, but the CA in {ca.directory} serves mesh "
                           f"{ca.mesh!r}")
        if node is not None and request.identity.node != node:
            raise PkiError(f"{origin} asks for {request.identity.uri}, not for node {node!r}")
        node = request.identity.node
    elif node is None:
        raise PkiError(f"{origin} names no {URI_PREFIX}<mesh>/<node> identity: give the node name "
                       "(sign NODE --csr FILE ...)")
    alt_names = node_alt_names(ca.mesh, node, request.dns + [normalize_dns_name(name) for name in dns],
                                request.ips + [parse_ip_address(address) for address in ips])
    now = as_utc(now)
    not_before, not_after, notes = validity(ca, days, now)
    if request.ignored:
        notes.append(f"ignored what {origin} asks for besides its names ({', '.join(request.ignored)}): the "
                     "certificate follows the CA's policy (CA:FALSE, EKU serverAuth + clientAuth)")
    out_dir = make_private_dir(Path(out_dir))
    cert_path = out_dir / NODE_CERT
    refuse_existing([cert_path], force)
    _refuse_other_key(out_dir / NODE_KEY, public_key, f"the key of {origin}")
    cert = sign_node_cert(ca, node, public_key, alt_names, not_before, not_after)
    write_file(cert_path, pem(cert, *ca.chain), PUBLIC_MODE, replace=force)
    record_issued(ca, cert)
    return Issued(cert, cert_path, None, tuple(notes))


def _refuse_other_key(key_path: Path, public_key: object, what: str) -> None:
    """If a node.key sits where a certificate for ``public_key`` goes, it must be that key (else the pair breaks)."""
    if not key_path.exists():
        return
    try:
        existing = load_private_key(key_path)
    except IdentityError:
        return  # encrypted or unreadable: not a node.key the daemon could use anyway; leave it to the operator
    if public_key_der(existing.public_key()) != public_key_der(public_key):
        raise PkiError(f"{key_path} is not {what}: the certificate would not match the key beside it "
                       "(write it elsewhere with --out)")


def renew_node_cert(ca: CertificateAuthority, node: str, out_dir: Path | str, *, new_key: bool = False,
                    key_type: str | None = None, days: int = DEFAULT_NODE_DAYS, force: bool = False,
                    now: dt.datetime | None = None) -> Issued:
    """A new certificate for a node already issued, with the same identity, DNS and IP SANs.

    The current certificate is out_dir/node.crt, or else the newest one recorded as issued to ``node``. The key
    stays the same (the certificate's public key: the CA host needs no private key) unless ``new_key``, which
    makes a new one (``key_type``, default: the current key's type). Files in use are not replaced unless
    ``force``: the new files are written beside them as node.crt.new (and node.key.new), see ``Issued.staged``.
    A revoked certificate is not renewed.
    """
    node = validate_name(node, "node")
    if key_type is not None:
        if not new_key:
            raise PkiError("--key-type applies to a new key: add --new-key (without it the key stays the same)")
        check_key_type(key_type)
    out_dir = Path(out_dir)
    current, source = _current_node_cert(ca, node, out_dir)
    _refuse_revoked(ca, current, source)
    old_names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = [normalize_dns_name(name) for name in old_names.get_values_for_type(x509.DNSName)]
    ips = list(old_names.get_values_for_type(x509.IPAddress))
    alt_names = node_alt_names(ca.mesh, node, dns, ips)
    now = as_utc(now)
    not_before, not_after, notes = validity(ca, days, now)
    key: PrivateKeyTypes | None = None
    if new_key:
        key = generate_key(key_type or key_type_of(current.public_key()) or DEFAULT_KEY_TYPE)
        public_key: object = key.public_key()
    else:
        public_key = current.public_key()
        check_public_key(public_key, f"the key of {source}")
        _refuse_other_key(out_dir / NODE_KEY, public_key, f"the key of {source}: renew with --new-key")
    out_dir = make_private_dir(out_dir)
    targets = ([out_dir / NODE_KEY] if new_key else []) + [out_dir / NODE_CERT]
    staged = not force and any(path.exists() for path in targets)
    if staged:
        writes = [(path.with_name(path.name + STAGED_SUFFIX), path) for path in targets]
        for written, _ in writes:
            if written.exists():
                raise PkiError(f"{written} exists (from an earlier renew?): install it or remove it first, "
                               "or use --force to replace the files in use")
    else:
        writes = [(path, path) for path in targets]
    cert = sign_node_cert(ca, node, public_key, alt_names, not_before, not_after)
    key_path = None
    if key is not None:  # the key first: a cert without its key is never left alone in place
        key_path = writes[0][0]
        write_file(key_path, key_pem(key, None), SECRET_MODE, replace=force)
    cert_path = writes[-1][0]
    write_file(cert_path, pem(cert, *ca.chain), PUBLIC_MODE, replace=force)
    record_issued(ca, cert)
    if not staged:  # files staged by an earlier renew no longer match what is in use: a trap, so remove them
        for path in targets:
            stale = path.with_name(path.name + STAGED_SUFFIX)
            if stale.exists():
                stale.unlink()
                notes.append(f"removed {stale}, left by an earlier renew (superseded)")
    return Issued(cert, cert_path, key_path, tuple(notes), tuple(writes) if staged else ())


def _current_node_cert(ca: CertificateAuthority, node: str, out_dir: Path) -> tuple[x509.Certificate, str]:
    """The certificate ``renew`` starts from, and where it was found."""
    cert_path = out_dir / NODE_CERT
    if cert_path.exists():
        cert, source = load_certificates(cert_path)[0], str(cert_path)
    else:
        recorded = [cert for cert in issued_certificates(ca) if node_name(cert) == node]
        if not recorded:
            raise PkiError(f"nothing to renew: no {cert_path}, and no certificate issued to node {node!r} is "
                           f"recorded in {ca.directory / ISSUED} (issue one with `sign`)")
        cert = max(recorded, key=lambda recorded_cert: recorded_cert.not_valid_before_utc)
        source = f"{ca.directory / ISSUED}/{cert.serial_number:x}.pem"
    try:
        found = identity_of(cert)
    except IdentityError as exc:
        raise PkiError(f"{source}: {exc}") from None
    expected = NodeIdentity(ca.mesh, node)
    if found != expected:
        raise PkiError(f"{source} is the certificate of {found.uri}, not of {expected.uri}")
    return cert, source


def _refuse_revoked(ca: CertificateAuthority, cert: x509.Certificate, source: str) -> None:
    if not issued_by(cert, ca.cert):
        return  # serial numbers are per issuer: this CA's CRL says nothing about it
    crl = current_crl(ca)
    if crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise PkiError(f"{source} (serial {cert.serial_number:x}) is revoked: renew will not bring a revoked "
                       "node back; issue a new certificate with `sign` if that is what you mean")


