"""What the operator reads: `print` (certificates, chains, CAs, CRLs) and the trust policy `verify` uses."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from quicmesh.errors import IdentityError
from quicmesh.protocol.dates import as_utc, days_left, format_utc
from quicmesh.protocol.identity import (
    TrustPolicy,
    ca_mesh,
    certificate_label,
    fingerprint,
    identity_of,
    is_ca_certificate,
    load_certificates,
    load_crls,
)

from pki import PkiError

EXPIRY_WARNING_DAYS = 30
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def describe_file(path: Path | str, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One description per certificate (in file order), then per CRL, of a PEM file."""
    data = Path(path).read_bytes()
    now = as_utc(now)
    items = []
    if b"-----BEGIN CERTIFICATE-----" in data:
        items += [describe_certificate(cert, now) for cert in load_certificates(path)]
    if b"-----BEGIN X509 CRL-----" in data:
        items += [describe_crl(crl, now) for crl in load_crls(path)]
    if not items:
        raise PkiError(f"{path}: no PEM certificate or CRL found")
    return items


def describe_certificate(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    """The facts an operator checks about a certificate, JSON-ready."""
    now = as_utc(now)
    left = days_left(cert.not_valid_after_utc, now)
    item: dict[str, Any] = {"kind": "certificate", "label": certificate_label(cert)}
    warnings = []
    if is_ca_certificate(cert):
        item.update(kind="ca", root=cert.subject == cert.issuer, mesh=ca_mesh(cert))
    else:
        try:
            identity = identity_of(cert)
            item.update(kind="node", identity=identity.uri, mesh=identity.mesh, node=identity.node)
        except IdentityError as exc:
            warnings.append(str(exc))
    item.update(
        fingerprint=fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        sans=_alt_names(cert),
        key=_key_description(cert),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        days_left=round(left, 1),
    )
    if now < cert.not_valid_before_utc:
        warnings.append(f"not valid before {format_utc(cert.not_valid_before_utc)}")
    if left < 0:
        warnings.append(f"EXPIRED {-left:.1f} days ago")
    elif left < EXPIRY_WARNING_DAYS:
        warnings.append(f"expires in {left:.1f} days: renew it")
    item["warnings"] = warnings
    return item


def describe_crl(crl: x509.CertificateRevocationList, now: dt.datetime | None = None) -> dict[str, Any]:
    now = as_utc(now)
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    next_update = crl.next_update_utc
    return {
        "kind": "crl",
        "label": f"CRL of '{crl.issuer.rfc4514_string()}'",
        "issuer": crl.issuer.rfc4514_string(),
        "number": number,
        "last_update": crl.last_update_utc.isoformat(),
        "next_update": next_update.isoformat() if next_update else None,
        "revoked": [{"serial": f"{entry.serial_number:x}", "revoked_on": entry.revocation_date_utc.isoformat()}
                    for entry in crl],
        "warnings": ([f"overdue: its next update was due {format_utc(next_update)}; refresh it with "
                      "`quicmesh-pki crl`"] if next_update and next_update < now else []),
    }


def format_text(items: list[dict[str, Any]]) -> str:
    """The human form of describe_file()'s result."""
    blocks = []
    for item in items:
        heading = item["label"]
        if item["kind"] == "ca":
            heading += " (root)" if item["root"] else " (intermediate)"
        lines = [heading]
        if item["kind"] == "crl":
            rows = [("issuer", item["issuer"]), ("number", item["number"]),
                    ("last update", _human(item["last_update"])), ("next update", _human(item["next_update"])),
                    ("revoked", len(item["revoked"]))]
            rows += [("  serial", f"{entry['serial']} on {_human(entry['revoked_on'])}") for entry in item["revoked"]]
        else:
            rows = [("identity", item.get("identity")), ("mesh", item.get("mesh")),
                    ("fingerprint", item["fingerprint"]), ("subject", item["subject"]), ("issuer", item["issuer"]),
                    ("serial", item["serial"]), ("SANs", ", ".join(item["sans"]) or "none"), ("key", item["key"]),
                    ("not before", _human(item["not_before"])),
                    ("not after", f"{_human(item['not_after'])} ({item['days_left']} days left)")]
        lines += [f"  {name + ':':<13}{value}" for name, value in rows if value is not None]
        lines += [f"  WARNING: {warning}" for warning in item["warnings"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _human(iso: str | None) -> str | None:
    return format_utc(dt.datetime.fromisoformat(iso)) if iso else None


def trust_policy_for(ca_path: Path | str, crl_path: Path | str | None = None, mesh: str | None = None
                     ) -> TrustPolicy:
    """The policy `verify` checks with: ``mesh`` or, by default, the one the CA bundle records."""
    if mesh is None:
        meshes = {found for cert in load_certificates(ca_path) if (found := ca_mesh(cert))}
        if len(meshes) != 1:
            raise PkiError(f"{ca_path} records {'no mesh' if not meshes else 'several meshes'}: give --mesh")
        mesh = meshes.pop()
    return TrustPolicy.from_files(ca_path, mesh, crl_path)


def _alt_names(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    prefixes = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS", x509.IPAddress: "IP"}
    return [f"{prefixes.get(type(name), type(name).__name__)}:{name.value}" for name in names]


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA-{key.key_size}"
    return type(key).__name__
