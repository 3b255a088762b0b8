"""Identity rules: which node a certificate names, and whether this mesh trusts it.

Pure code (no asyncio, no sockets): the transport calls ``TrustPolicy.verify()`` on every handshake, and
``quicmesh-pki`` issues and checks certificates with the same rules.

A node certificate names its node with exactly one URI SAN ``quicmesh://<mesh>/<node>``; a CA made by
quicmesh-pki records its mesh with the URI SAN ``quicmesh://<mesh>``.

The certification path is checked here rather than by ``cryptography.x509.verification``: with
cryptography 50 that verifier refuses Ed25519 CA keys ("Forbidden public key algorithm"), which
quicmesh-pki offers. The rules below are the ones of RFC 5280 that matter for a private CA: issuer/subject
chaining, signatures, basicConstraints CA and pathLenConstraint, keyCertSign, validity of every
certificate, unknown critical extensions, plus revocation by CRL and fingerprint. Only the mesh CA bundle
is trusted, never the system roots; any certificate in the bundle (root or intermediate) is an anchor.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

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
from quicmesh.protocol.dates import as_utc, format_utc
from quicmesh.protocol.fingerprints import normalize_fingerprint
from quicmesh.protocol.names import validate_name

URI_PREFIX = "quicmesh://"
MAX_PATH_LENGTH = 8
"""Most certificates in a path (leaf, intermediates, anchor), and in what a peer may present."""
MAX_SIGNATURE_CHECKS = 32
"""Bounds the path search on hostile input (many certificates that all claim to issue each other)."""

_CRITICAL_EXTENSIONS_UNDERSTOOD = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
})
_WEAK_SIGNATURE_HASHES = (hashes.MD5, hashes.SHA1)
_NODE_EKUS = ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"), (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"))
_MALFORMED = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
              x509.UnsupportedGeneralNameType)
"""What cryptography raises when it meets malformed DER; it parses lazily, so this can surface late."""

Source = Union[str, "os.PathLike[str]", bytes]
_T = TypeVar("_T")


class CrlError(IdentityError):
    """A CRL is unreadable, or not signed by a CA of the mesh bundle (so it cannot be trusted)."""


# --- names and URIs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeIdentity:
    """The identity a verified certificate proves: node ``node`` of mesh ``mesh``."""

    mesh: str
    node: str

    def __post_init__(self) -> None:
        validate_name(self.mesh, "mesh")
        validate_name(self.node, "node")

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.mesh}/{self.node}"

    def __str__(self) -> str:
        return self.uri


def identity_uri(mesh: str, node: str) -> str:
    """The URI SAN that names ``node`` of ``mesh``; raises InvalidNameError for a bad name."""
    return NodeIdentity(mesh, node).uri


def mesh_uri(mesh: str) -> str:
    """The URI SAN by which a CA records the mesh it serves."""
    return URI_PREFIX + validate_name(mesh, "mesh")


def parse_identity_uri(uri: str) -> NodeIdentity:
    """``quicmesh://<mesh>/<node>`` -> NodeIdentity; IdentityError (or InvalidNameError) otherwise."""
    mesh, node = _split_uri(uri)
    if node is None:
        raise IdentityError(f"URI {uri!r} names mesh {mesh!r} but no node (a CA's mesh URI, not a node identity)")
    return NodeIdentity(mesh, node)


def _split_uri(uri: str) -> tuple[str, str | None]:
    """``quicmesh://m/n`` -> (m, n); ``quicmesh://m`` -> (m, None)."""
    if not isinstance(uri, str) or not uri.startswith(URI_PREFIX):
        raise IdentityError(f"{uri!r} is not a {URI_PREFIX} URI")
    mesh, slash, node = uri[len(URI_PREFIX):].partition("/")
    try:
        validate_name(mesh, "mesh")
        if slash:
            validate_name(node, "node")
    except InvalidNameError as exc:
        raise InvalidNameError(f"URI {uri!r}: {exc}") from None
    return mesh, (node if slash else None)


# --- reading certificates -----------------------------------------------------------------------
def identity_of(cert: x509.Certificate) -> NodeIdentity:
    """The node a certificate claims to be (its one quicmesh URI SAN). Claims only: see TrustPolicy."""
    uris = _quicmesh_uris(_require_certificate(cert))
    if not uris:
        raise IdentityError(f"the {certificate_label(cert)} has no {URI_PREFIX} URI SAN, so it names no node "
                            "(it is not a quicmesh node certificate)")
    if len(uris) > 1:
        raise IdentityError(f"the {certificate_label(cert)} has {len(uris)} {URI_PREFIX} URI SANs "
                            f"({', '.join(uris)}): a node certificate must have exactly one")
    return parse_identity_uri(uris[0])


def ca_mesh(cert: x509.Certificate) -> str | None:
    """The mesh a CA certificate records with a ``quicmesh://<mesh>`` URI SAN, or None if it names none."""
    meshes = {_split_uri(uri)[0] for uri in _quicmesh_uris(_require_certificate(cert))}
    if len(meshes) > 1:
        raise IdentityError(f"the {certificate_label(cert)} names several meshes: {', '.join(sorted(meshes))}")
    return meshes.pop() if meshes else None


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the DER certificate: what denylists and pins hold."""
    return "sha256:" + _require_certificate(cert).fingerprint(hashes.SHA256()).hex()


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """True if basicConstraints says CA:TRUE (only such certificates may issue others)."""
    constraints = _extension(cert, x509.BasicConstraints)
    return constraints is not None and constraints.ca


def certificate_label(cert: x509.Certificate) -> str:
    """How messages name a certificate: its quicmesh identity, else its subject. Never raises."""
    try:
        subject = cert.subject.rfc4514_string() or "(empty subject)"
    except _MALFORMED:
        subject = "(malformed subject)"
    try:
        constraints = _raw_extension(cert, x509.BasicConstraints)
        uris = _quicmesh_uris(cert)
    except (IdentityError, *_MALFORMED):
        return f"certificate '{subject}'"
    if constraints is not None and constraints.ca:
        return f"CA certificate '{subject}'"
    if len(uris) == 1:
        return f"node certificate {uris[0]}"
    return f"certificate '{subject}'"


def _require_certificate(cert: object) -> x509.Certificate:
    if not isinstance(cert, x509.Certificate):
        raise IdentityError(f"expected an x509.Certificate, got {type(cert).__name__}")
    return cert


def _raw_extension(cert: x509.Certificate, kind: type) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _extension(cert: x509.Certificate, kind: type) -> x509.ExtensionType | None:
    """The extension's value, None if absent; malformed extensions become a ChainError."""
    try:
        return _raw_extension(cert, kind)
    except _MALFORMED as exc:
        raise ChainError(f"the {certificate_label(cert)} has malformed extensions: {exc}") from None


def _quicmesh_uris(cert: x509.Certificate) -> list[str]:
    names = _extension(cert, x509.SubjectAlternativeName)
    if names is None:
        return []
    return [uri for uri in names.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(URI_PREFIX)]


# --- loading files ------------------------------------------------------------------------------
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


def load_certificates(source: Source) -> list[x509.Certificate]:
    """Every certificate of a PEM file (or PEM bytes), in file order; IdentityError if there is none."""
    return _load_pem_objects(source, "CERTIFICATE", x509.load_pem_x509_certificate, "certificate", IdentityError)


def load_crls(source: Source) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file (e.g. the root's and an intermediate's, concatenated), in file order."""
    return _load_pem_objects(source, "X509 CRL", x509.load_pem_x509_crl, "CRL", CrlError)


def _load_pem_objects(source: Source, kind: str, load: Callable[[bytes], _T], what: str,
                      error: type[IdentityError]) -> list[_T]:
    data, origin = _read(source, f"{what} file", error)
    loaded = []
    for number, block in enumerate(_pem_blocks(data, kind), start=1):
        try:
            loaded.append(load(block))
        except _MALFORMED as exc:
            raise error(f"{origin}: {what} #{number} is malformed ({exc})") from None
    if not loaded:
        raise error(f"{origin}: no PEM {what} found{_pem_hint(data)}")
    return loaded


def load_crl(source: Source) -> x509.CertificateRevocationList:
    """The one CRL of a PEM file; CrlError if it holds none or several."""
    crls = load_crls(source)
    if len(crls) > 1:
        raise CrlError(f"{_origin(source)}: holds {len(crls)} CRLs, expected one")
    return crls[0]


def load_private_key(path: Source, passphrase: bytes | None = None) -> PrivateKeyTypes:
    """A PEM private key, decrypted with ``passphrase`` if it is encrypted; IdentityError saying why not."""
    data, origin = _read(path, "private key", IdentityError)
    if isinstance(passphrase, str):
        passphrase = passphrase.encode()
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    try:
        return serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except TypeError:  # cryptography's way of saying "this key needs a passphrase"
        raise IdentityError(f"{origin}: the key is encrypted and no passphrase was given") from None
    except ValueError:
        if encrypted and passphrase is not None:
            raise IdentityError(f"{origin}: wrong passphrase (cannot decrypt the key)") from None
        raise IdentityError(f"{origin}: not a PEM private key{_pem_hint(data)}") from None
    except UnsupportedAlgorithm as exc:
        raise IdentityError(f"{origin}: unsupported key type ({exc})") from None


def _read(source: Source, what: str, error: type[IdentityError]) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), f"{what} (in memory)"
    try:
        with open(source, "rb") as file:
            return file.read(), os.fspath(source)
    except OSError as exc:
        raise error(f"cannot read {what} {os.fspath(source)}: {exc.strerror or exc}") from None
    except TypeError:
        raise error(f"{what}: expected a path or bytes, got {type(source).__name__}") from None


def _origin(source: Source) -> str:
    return "(in memory)" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def _pem_blocks(data: bytes, kind: str) -> list[bytes]:
    return [match.group(0) for match in _PEM_BLOCK.finditer(data) if match.group(1) == kind.encode()]


def _pem_hint(data: bytes) -> str:
    """Why a file did not hold what was expected, for the error message."""
    if not data.strip():
        return " (the file is empty)"
    kinds = sorted({match.group(1).decode() for match in _PEM_BLOCK.finditer(data)})
    if kinds:
        return f" (it holds: {', '.join(kinds)})"
    return " (not PEM: no -----BEGIN ...----- block; DER files can be converted with openssl)"


# --- the trust decision -------------------------------------------------------------------------
class TrustPolicy:
    """What one mesh trusts: its CA bundle (the only anchors), CRLs, fingerprint denylist and name.

    Build it when the config is (re)loaded; then ``verify()`` each peer's chain. A CRL not signed by a CA
    of the bundle is refused here, so that a forged CRL cannot silently revoke (or fail to revoke) peers.
    The denylist matches exact DER encodings, and ECDSA signatures can be re-encoded by whoever holds the
    certificate: revoke with the CRL (issuer + serial), and use the denylist as a stopgap.
    """

    def __init__(
        self,
        ca_certs: Sequence[x509.Certificate],
        mesh: str,
        crls: Sequence[x509.CertificateRevocationList] = (),
        denylist: Iterable[str] = (),
    ) -> None:
        self.mesh = validate_name(mesh, "mesh")
        self.ca_certs = tuple(ca_certs)
        if not self.ca_certs:
            raise ChainError("the CA bundle is empty: at least one CA certificate is needed")
        for cert in self.ca_certs:
            if not is_ca_certificate(_require_certificate(cert)):
                raise ChainError(f"CA bundle: {certificate_label(cert)} is not a CA certificate "
                                 "(basicConstraints CA:TRUE is missing)")
        self._anchors = {_der(cert) for cert in self.ca_certs}
        self.crls = tuple(crls)
        self._crls_by_signer = [(_public_key_der(self._crl_signer(crl)), crl) for crl in self.crls]
        if isinstance(denylist, str):
            raise IdentityError("denylist must be a list of fingerprints, not a single string")
        self.denylist = frozenset(normalize_fingerprint(entry) for entry in denylist)

    @classmethod
    def from_files(
        cls,
        ca_path: Source,
        mesh: str,
        crl_path: Source | None = None,
        denylist: Iterable[str] = (),
    ) -> TrustPolicy:
        """Load the CA bundle and (optionally) a PEM file of CRLs; errors name the file."""
        crls = load_crls(crl_path) if crl_path is not None else ()
        try:
            return cls(load_certificates(ca_path), mesh, crls, denylist)
        except CrlError as exc:
            raise CrlError(f"{_origin(crl_path)}: {exc}") from None

    def verify(
        self,
        chain: Sequence[x509.Certificate],
        *,
        now: dt.datetime | None = None,
        expect_node: str | None = None,
        allowed_nodes: Collection[str] | None = None,
        pin: str | None = None,
    ) -> NodeIdentity:
        """Check a peer's chain (leaf first, then what it sent) and return the identity it proves.

        ``expect_node``: the dialed peer's name; ``allowed_nodes``: who may connect; ``pin``: the
        configured fingerprint. Raises the IdentityError subclass of the first rule broken, in this order:
        ChainError, ValidityError, UsageError, RevokedError, IdentityMismatchError, PinMismatchError.
        """
        try:
            return self._verify(chain, as_utc(now), expect_node, allowed_nodes, pin)
        except _MALFORMED as exc:
            raise ChainError(f"malformed certificate in the chain: {exc}") from None

    def _verify(self, chain, now, expect_node, allowed_nodes, pin) -> NodeIdentity:
        if not chain:
            raise ChainError("no certificate was presented")
        for index, cert in enumerate(chain):
            if not isinstance(cert, x509.Certificate):
                raise ChainError(f"chain[{index}] is a {type(cert).__name__}, not an x509.Certificate")
        leaf = chain[0]
        path = self._build_path(leaf, chain[1:], now)
        _check_critical_extensions(path)
        _check_validity(path, now)
        _check_node_usage(leaf)
        self._check_revocation(path)
        identity = identity_of(leaf)
        if identity.mesh != self.mesh:
            raise IdentityMismatchError(f"certificate is for mesh {identity.mesh!r} ({identity.uri}), "
                                        f"this mesh is {self.mesh!r}")
        if expect_node is not None and identity.node != expect_node:
            raise IdentityMismatchError(f"expected node {expect_node!r}, but the certificate is for {identity.uri}")
        if allowed_nodes is not None and identity.node not in allowed_nodes:
            raise IdentityMismatchError(f"{identity.uri} is not a configured peer of this node")
        if pin is not None and fingerprint(leaf) != normalize_fingerprint(pin):
            raise PinMismatchError(f"{identity.uri} presented certificate {fingerprint(leaf)}, "
                                   f"but its pinned fingerprint is {normalize_fingerprint(pin)}")
        return identity

    def _build_path(self, leaf: x509.Certificate, sent: Sequence[x509.Certificate],
                    now: dt.datetime) -> list[x509.Certificate]:
        """A path from ``leaf`` up to an anchor of the bundle, every signature checked.

        Prefers a path valid at ``now``; else returns one anyway so that the validity check can say which
        certificate is out of date. Raises ChainError with the deepest problem met if there is none. The
        search is bounded (certificates sent, signature checks) since it runs before the peer is trusted.
        """
        if _der(leaf) in self._anchors:
            raise ChainError(f"the mesh's own {certificate_label(leaf)} was presented instead of a node certificate")
        if len(sent) >= MAX_PATH_LENGTH:
            raise ChainError(f"{len(sent) + 1} certificates were presented; at most {MAX_PATH_LENGTH} are accepted")
        pool = list({_der(cert): cert for cert in (*sent, *self.ca_certs)}.values())
        paths: list[list[x509.Certificate]] = []
        problems: list[tuple[int, str]] = []
        checks_left = MAX_SIGNATURE_CHECKS

        def extend(path: list[x509.Certificate]) -> bool:
            """Search upwards from ``path[-1]``; True once a path valid at ``now`` is found (search ends)."""
            nonlocal checks_left
            current = path[-1]
            if len(path) > 1 and _der(current) in self._anchors:
                paths.append(path)
                return all(_valid_at(cert, now) for cert in path)
            if len(path) >= MAX_PATH_LENGTH:
                problems.append((len(path), f"the chain is longer than {MAX_PATH_LENGTH} certificates"))
                return False
            in_path = {_der(cert) for cert in path}
            issuers = [cert for cert in pool if cert.subject == current.issuer and _der(cert) not in in_path]
            if not issuers:
                problems.append((len(path), _no_issuer_message(current, len(sent))))
            issuers.sort(key=lambda cert: (_der(cert) not in self._anchors, not _valid_at(cert, now)))
            for issuer in issuers:
                if checks_left == 0:
                    problems.append((MAX_PATH_LENGTH, "too many candidate issuers to check: refusing the chain"))
                    return False
                checks_left -= 1
                problem = _issuer_problem(current, issuer, path)
                if problem:
                    problems.append((len(path), problem))
                elif extend([*path, issuer]):
                    return True
            return False

        if extend([leaf]):
            return paths[-1]
        if paths:
            return paths[0]
        deepest = max(depth for depth, _ in problems)
        raise ChainError(next(message for depth, message in problems if depth == deepest))

    def _crl_signer(self, crl: object) -> x509.Certificate:
        """The bundle CA that signed ``crl``; CrlError if none did."""
        if not isinstance(crl, x509.CertificateRevocationList):
            raise CrlError(f"expected an x509.CertificateRevocationList, got {type(crl).__name__}")
        for ca in self.ca_certs:
            if ca.subject == crl.issuer and _signed_crl(ca, crl):
                return ca
        raise CrlError(f"the CRL issued by '{crl.issuer.rfc4514_string()}' is not signed by any CA of the mesh "
                       "CA bundle (or that CA lacks cRLSign): refusing it")

    def _check_revocation(self, path: list[x509.Certificate]) -> None:
        for cert in path:
            if fingerprint(cert) in self.denylist:
                raise RevokedError(
                    f"the {certificate_label(cert)} ({fingerprint(cert)}) is on the fingerprint denylist")
        for cert, issuer in zip(path, path[1:]):
            issuer_key = _public_key_der(issuer)
            for signer_key, crl in self._crls_by_signer:
                if signer_key != issuer_key or crl.issuer != issuer.subject:
                    continue
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    raise RevokedError(
                        f"the {certificate_label(cert)} (serial {cert.serial_number:x}) was revoked on "
                        f"{format_utc(entry.revocation_date_utc)} by the CRL of '{issuer.subject.rfc4514_string()}'")


def _issuer_problem(cert: x509.Certificate, issuer: x509.Certificate, path: list[x509.Certificate]) -> str | None:
    """Why ``issuer`` cannot be the next certificate of ``path`` (ending at ``cert``), or None."""
    issuer_name = f"'{issuer.subject.rfc4514_string()}'"
    constraints = _extension(issuer, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        return f"the {certificate_label(cert)} names {issuer_name} as its issuer, but that certificate is not a CA"
    usage = _extension(issuer, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return f"CA {issuer_name} has a key usage without keyCertSign, so it may not issue certificates"
    intermediates_below = sum(1 for below in path[1:] if below.subject != below.issuer)
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        return (f"CA {issuer_name} allows {constraints.path_length} intermediate CA(s) below it "
                f"(pathLenConstraint), but the chain has {intermediates_below}")
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return (f"the signature on the {certificate_label(cert)} does not verify with the key of {issuer_name}: "
                "it was tampered with, or signed by another CA with the same name")
    except _MALFORMED as exc:
        return f"cannot check the signature on the {certificate_label(cert)} with {issuer_name}: {exc}"
    if isinstance(cert.signature_hash_algorithm, _WEAK_SIGNATURE_HASHES):
        return f"the {certificate_label(cert)} is signed with {cert.signature_hash_algorithm.name}, which is too weak"
    return None


def _no_issuer_message(cert: x509.Certificate, sent_count: int) -> str:
    return (f"the {certificate_label(cert)} was issued by '{cert.issuer.rfc4514_string()}', which is not in the "
            f"mesh CA bundle and was not sent with it ({sent_count} intermediate(s) sent): it is from a foreign CA, "
            "or an intermediate is missing")


def _check_validity(path: list[x509.Certificate], now: dt.datetime) -> None:
    for cert in path:
        if now < cert.not_valid_before_utc:
            raise ValidityError(f"the {certificate_label(cert)} is not valid before "
                                f"{format_utc(cert.not_valid_before_utc)} (it is now {format_utc(now)}; check clocks)")
        if now > cert.not_valid_after_utc:
            raise ValidityError(f"the {certificate_label(cert)} expired on {format_utc(cert.not_valid_after_utc)} "
                                f"(it is now {format_utc(now)})")


def _check_critical_extensions(path: list[x509.Certificate]) -> None:
    """RFC 5280: a certificate with a critical extension the verifier does not process must be refused."""
    for cert in path:
        for extension in cert.extensions:
            if extension.critical and extension.oid not in _CRITICAL_EXTENSIONS_UNDERSTOOD:
                raise ChainError(f"the {certificate_label(cert)} has a critical extension quicmesh does not "
                                 f"process ({extension.oid.dotted_string}): refusing it")


def _check_node_usage(leaf: x509.Certificate) -> None:
    label = certificate_label(leaf)
    if is_ca_certificate(leaf):
        raise UsageError(f"the {label} is a CA certificate (basicConstraints CA:TRUE), not a node certificate")
    usages = _extension(leaf, x509.ExtendedKeyUsage)
    missing = [name for oid, name in _NODE_EKUS if usages is None or oid not in usages]
    if missing:
        raise UsageError(f"the {label} lacks extended key usage {' and '.join(missing)}: a node both accepts "
                         "and dials, so it needs serverAuth and clientAuth")
    key_usage = _extension(leaf, x509.KeyUsage)
    if key_usage is not None and not key_usage.digital_signature:
        raise UsageError(f"the {label} has a key usage without digitalSignature, which TLS 1.3 needs")


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _signed_crl(ca: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    usage = _extension(ca, x509.KeyUsage)
    if usage is not None and not usage.crl_sign:
        return False
    try:
        return crl.is_signature_valid(ca.public_key())
    except _MALFORMED:
        return False


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


__all__ = [
    "URI_PREFIX",
    "CrlError",
    "NodeIdentity",
    "TrustPolicy",
    "ca_mesh",
    "certificate_label",
    "fingerprint",
    "identity_of",
    "identity_uri",
    "is_ca_certificate",
    "load_certificates",
    "load_crl",
    "load_crls",
    "load_private_key",
    "mesh_uri",
    "parse_identity_uri",
]
