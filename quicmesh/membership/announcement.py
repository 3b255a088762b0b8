"""Signed membership announcements (docs/PROTOCOL.md "Membership"): who a node is, where it can be reached.

A node signs its announcement with its own node key and carries its certificate chain in it, so any member
can forward it unchanged (``raw``) and every receiver checks it against the mesh CA exactly as it checks a
handshake: a forwarder can neither forge nor alter one, and a member cannot announce another member's name.

Pure (cryptography, no aioquic, no I/O). decode_announcement checks structure only and raises only
ProtocolError; verify_announcement does the trust checks and raises IdentityError (AnnouncementError for
the announcement's own rules).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from quicmesh.config.schema import parse_address
from quicmesh.errors import AnnouncementError
from quicmesh.membership import codec
from quicmesh.membership.codec import MAX_ANNOUNCEMENT_SIZE, FieldReader, violation
from quicmesh.protocol import identity
from quicmesh.protocol.dates import as_utc
from quicmesh.protocol.identity import _MALFORMED
from quicmesh.protocol.names import validate_name
from quicmesh.protocol.wire.common import MAX_VARINT, encode_varint

FORMAT = 1
SIGNATURE_CONTEXT = b"quicmesh-announcement-v1\x00"
"""Prefixed to the signed bytes, so that an announcement signature can never pass for any other signature."""
MAX_ADDRESSES = 8
MAX_ADDRESS_BYTES = 255
MAX_SERVICES = 32
MAX_CHAIN = 4
MAX_CERTIFICATE_BYTES = 8 * 1024
MAX_SIGNATURE_BYTES = 1024  # RSA-8192; ECDSA P-384 signatures are ~104 bytes
_RELAY, _LEAVING = 0x1, 0x2
_CURVE_HASHES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_SIGNING_KEYS = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)


@dataclass(frozen=True)
class Announcement:
    """A node's signed statement about itself; ``raw`` is the exact encoding, forwarded unchanged."""

    mesh: str
    node: str
    version: int  # grows for a node across restarts: microseconds since the Unix epoch when signed (or last+1)
    epoch: int  # the node process's epoch (Context.epoch)
    issued_at: int  # Unix seconds when signed
    addresses: tuple[str, ...]  # "host:port" / "[v6]:port"
    services: tuple[str, ...]  # names of its forwarding services
    relay: bool  # serves relay circuits
    leaving: bool  # a departure, signed on graceful stop
    chain: tuple[bytes, ...] = field(repr=False)  # DER certificates, leaf first
    signature: bytes = field(repr=False)
    raw: bytes = field(compare=False, repr=False)


def sign_announcement(*, mesh: str, node: str, version: int, epoch: int, issued_at: int,
                      addresses: Sequence[str], services: Sequence[str], relay: bool, leaving: bool,
                      chain: Sequence[x509.Certificate], key: object) -> Announcement:
    """Encode and sign this node's announcement with ``key`` (the private key of ``chain[0]``).

    Bad values are this node's own mistake: ValueError (sizes, counts, addresses), InvalidNameError,
    AnnouncementError (a key that is not the leaf's, or of a type that cannot sign).
    """
    validate_name(mesh, "mesh")
    validate_name(node, "node")
    for service in services:
        validate_name(service, "service")
    for address in addresses:
        parse_address(address)
    if not chain:
        raise ValueError("an announcement needs the node's certificate chain (leaf first)")
    ders = tuple(cert.public_bytes(serialization.Encoding.DER) for cert in chain)
    if not isinstance(key, _SIGNING_KEYS):
        raise AnnouncementError(f"cannot sign an announcement with a {type(key).__name__} "
                                "(ECDSA P-256/P-384/P-521, RSA, Ed25519 or Ed448 keys can)")
    if _public_key_der(key.public_key()) != _public_key_der(chain[0].public_key()):
        raise AnnouncementError(f"the key given to sign with is not the key of the "
                                f"{identity.certificate_label(chain[0])}")
    signed = _encode_signed(mesh, node, version, epoch, issued_at, tuple(addresses), tuple(services),
                            relay, leaving, ders)
    signature = _sign(key, SIGNATURE_CONTEXT + signed)
    raw = signed + codec.blob(signature, 1, MAX_SIGNATURE_BYTES, "signature")
    if len(raw) > MAX_ANNOUNCEMENT_SIZE:
        raise ValueError(f"the announcement is {len(raw)} bytes, over the {MAX_ANNOUNCEMENT_SIZE}-byte limit "
                         "(fewer or shorter addresses, services or certificates)")
    return Announcement(mesh, node, version, epoch, issued_at, tuple(addresses), tuple(services), relay,
                        leaving, ders, signature, raw)


def decode_announcement(data: bytes) -> Announcement:
    """Parse an encoded announcement (structure and bounds only, nothing trusted yet); only ProtocolError."""
    if len(data) > MAX_ANNOUNCEMENT_SIZE:
        raise violation(f"announcement of {len(data)} bytes, over the {MAX_ANNOUNCEMENT_SIZE}-byte limit")
    data = bytes(data)
    reader = FieldReader(data, "announcement")
    if (form := reader.byte()) != FORMAT:
        raise violation(f"announcement format {form} (this node reads format {FORMAT})")
    mesh, node = reader.name("mesh"), reader.name("node")
    version, epoch, issued_at = reader.varint(), reader.varint(), reader.varint()
    flags = reader.varint()
    if flags & ~(_RELAY | _LEAVING):
        raise violation(f"announcement flags 0x{flags:x} has unknown bits")
    addresses = tuple(_read_address(reader) for _ in range(reader.count(MAX_ADDRESSES, 1, "addresses")))
    services = tuple(reader.name("service") for _ in range(reader.count(MAX_SERVICES, 2, "services")))
    if len(set(addresses)) != len(addresses) or len(set(services)) != len(services):
        raise violation("announcement repeats an address or a service")
    chain_length = reader.count(MAX_CHAIN, 2, "certificates")
    if chain_length == 0:
        raise violation("announcement without a certificate")
    chain = tuple(reader.blob(1, MAX_CERTIFICATE_BYTES, "certificate") for _ in range(chain_length))
    signature = reader.blob(1, MAX_SIGNATURE_BYTES, "signature")
    reader.end()
    return Announcement(mesh, node, version, epoch, issued_at, addresses, services, bool(flags & _RELAY),
                        bool(flags & _LEAVING), chain, signature, data)


def verify_announcement(announcement: Announcement, trust: identity.TrustPolicy, *, now: dt.datetime | None = None,
                        max_age: float, max_skew: float = 300.0) -> identity.NodeIdentity:
    """Check ``announcement`` as a handshake is checked, then its own rules; the identity it proves.

    Order: the chain for ``announcement.node`` (trust.verify: chain, dates, usage, revocation, mesh, name —
    its IdentityError subclasses propagate), the signature with the leaf's key, the announced mesh, and
    issued_at within [now - max_age, now + max_skew]. Every failure is one line saying why.
    """
    now = as_utc(now)
    chain = [_load_certificate(der, index) for index, der in enumerate(announcement.chain)]
    proven = trust.verify(chain, now=now, expect_node=announcement.node)
    try:
        signed = _encode_signed(announcement.mesh, announcement.node, announcement.version, announcement.epoch,
                                announcement.issued_at, announcement.addresses, announcement.services,
                                announcement.relay, announcement.leaving, announcement.chain)
    except ValueError as exc:  # only an Announcement built by hand, not by decode_announcement, gets here
        raise AnnouncementError(f"announcement of {proven.uri}: {exc}") from None
    if announcement.raw != signed + encode_varint(len(announcement.signature)) + announcement.signature:
        raise AnnouncementError(f"announcement of {proven.uri}: its bytes are not the canonical encoding of "
                                "its fields (altered, or non-shortest varints)")
    _check_signature(chain[0], announcement.signature, SIGNATURE_CONTEXT + signed, proven)
    if announcement.mesh != trust.mesh:
        raise AnnouncementError(f"announcement of {proven.uri} names mesh {announcement.mesh!r}, "
                                f"this mesh is {trust.mesh!r}")
    age = now.timestamp() - announcement.issued_at
    if age > max_age:
        raise AnnouncementError(f"announcement of {proven.uri} is stale: issued {age:.0f} s ago "
                                f"(at most {max_age:g} s accepted)")
    if -age > max_skew:
        raise AnnouncementError(f"announcement of {proven.uri} is issued {-age:.0f} s in the future "
                                f"(clock skew over {max_skew:g} s)")
    return proven


# --- encoding -----------------------------------------------------------------------------------
def _encode_signed(mesh: str, node: str, version: int, epoch: int, issued_at: int, addresses: tuple[str, ...],
                   services: tuple[str, ...], relay: bool, leaving: bool, chain: tuple[bytes, ...]) -> bytes:
    """Every field before the signature, canonically encoded: what the signature covers."""
    for what, value in (("version", version), ("epoch", epoch), ("issued_at", issued_at)):
        if not isinstance(value, int) or not 0 <= value <= MAX_VARINT:
            raise ValueError(f"announcement {what} {value!r} is out of range (0..2^62-1)")
    if len(set(addresses)) != len(addresses) or len(set(services)) != len(services):
        raise ValueError("an announcement lists each address and each service once")
    if len(chain) > MAX_CHAIN:
        raise ValueError(f"a chain of {len(chain)} certificates (at most {MAX_CHAIN} in an announcement)")
    parts = [bytes((FORMAT,)), codec.name(mesh, "mesh"), codec.name(node, "node"), encode_varint(version),
             encode_varint(epoch), encode_varint(issued_at),
             encode_varint((_RELAY if relay else 0) | (_LEAVING if leaving else 0)),
             codec.count(addresses, MAX_ADDRESSES, "addresses")]
    parts += [codec.blob(address.encode("utf-8"), 1, MAX_ADDRESS_BYTES, "address") for address in addresses]
    parts.append(codec.count(services, MAX_SERVICES, "services"))
    parts += [codec.name(service, "service") for service in services]
    parts.append(encode_varint(len(chain)))
    parts += [codec.blob(der, 1, MAX_CERTIFICATE_BYTES, "certificate") for der in chain]
    return b"".join(parts)


def _read_address(reader: FieldReader) -> str:
    raw = reader.blob(1, MAX_ADDRESS_BYTES, "address")
    try:
        address = raw.decode("ascii")
        parse_address(address)
    except ValueError:  # UnicodeDecodeError is one
        raise violation("announcement address is not HOST:PORT or [IPv6]:PORT") from None
    return address


# --- signatures ---------------------------------------------------------------------------------
def _sign(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
          data: bytes) -> bytes:
    """Sign with the algorithm the key's type implies (the verifier derives the same from the leaf)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(_curve_hash(key.curve)))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, _PSS, hashes.SHA256())
    return key.sign(data)  # Ed25519 / Ed448: the hash is part of the algorithm


def _check_signature(leaf: x509.Certificate, signature: bytes, data: bytes, proven: identity.NodeIdentity) -> None:
    try:
        public_key = leaf.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(_curve_hash(public_key.curve)))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, _PSS, hashes.SHA256())
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(signature, data)
        else:
            raise AnnouncementError(f"announcement of {proven.uri}: its certificate has a "
                                    f"{type(public_key).__name__}, which cannot sign announcements")
    except InvalidSignature:
        raise AnnouncementError(f"announcement of {proven.uri}: the signature does not verify with its "
                                "certificate's key (tampered, or signed by another key)") from None
    except _MALFORMED as exc:
        raise AnnouncementError(f"announcement of {proven.uri}: cannot check its signature ({exc})") from None


def _curve_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    try:
        return _CURVE_HASHES[curve.name]()
    except KeyError:
        raise AnnouncementError(f"ECDSA curve {curve.name} is not used for announcements "
                                "(P-256, P-384 or P-521)") from None


def _load_certificate(der: bytes, index: int) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except _MALFORMED as exc:
        raise AnnouncementError(f"announcement certificate #{index + 1} is not a DER certificate ({exc})") from None


def _public_key_der(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


__all__ = [
    "MAX_ANNOUNCEMENT_SIZE",
    "SIGNATURE_CONTEXT",
    "Announcement",
    "decode_announcement",
    "sign_announcement",
    "verify_announcement",
]
