"""Where quicmesh-pki keeps things, so that every command agrees on it.

CA directory:        ca.key (0600), ca.crt, chain.pem (intermediate CAs only), crl.pem, issued/<serial>.pem
Node directory:      node.key (0600), node.crt (leaf + intermediates); bootstrap adds ca.crt, crl.pem, node.toml;
                     `csr` writes node.csr; files that exist are not replaced: `renew` writes node.crt.new
                     (node.key.new) and a re-run of bootstrap node.toml.new beside them
Bootstrap directory: mesh.json, ca/ (a CA directory), <node>/ (a node directory per node)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quicmesh.errors import InvalidNameError
from quicmesh.protocol.names import validate_name

from pki import PkiError
from pki.files import PUBLIC_MODE, write_file

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_CHAIN = "chain.pem"
"""In an intermediate CA's directory: the certificates a node sends after its own (this CA first)."""
CRL = "crl.pem"
ISSUED = "issued"
"""Every certificate a CA issued, as issued/<serial hex>.pem: what lets `revoke NODE` find them."""

NODE_KEY = "node.key"
NODE_CERT = "node.crt"
NODE_CONFIG = "node.toml"
NODE_CSR = "node.csr"
STAGED_SUFFIX = ".new"
"""What `renew` and `bootstrap` append to a file in use that they do not replace: node.crt.new, node.toml.new."""

MANIFEST = "mesh.json"
BOOTSTRAP_CA = "ca"


@dataclass(frozen=True)
class MeshManifest:
    """What mesh.json records: the mesh and its nodes' addresses ("HOST:PORT"), in the order they joined."""

    mesh: str
    nodes: dict[str, str]


def read_manifest(out_dir: Path) -> MeshManifest | None:
    """The mesh.json of a bootstrap directory, or None if there is none."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        nodes = {validate_name(node["name"]): node["address"] for node in document["nodes"]}
        return MeshManifest(validate_name(document["mesh"], "mesh"), nodes)
    except (ValueError, KeyError, TypeError, InvalidNameError) as exc:
        raise PkiError(f"{path}: not a mesh.json written by quicmesh-pki bootstrap ({exc!r})") from None


def refresh_crl_copies(ca_dir: Path) -> list[Path]:
    """If ``ca_dir`` is the CA of a bootstrap directory, copy its crl.pem into every node directory.

    Nodes read the crl.pem next to their node.toml, so a SIGHUP is then enough to apply a revocation.
    """
    out_dir = ca_dir.parent
    manifest = read_manifest(out_dir)
    if manifest is None or ca_dir.resolve() != (out_dir / BOOTSTRAP_CA).resolve():
        return []
    crl = (ca_dir / CRL).read_bytes()
    refreshed = []
    for name in manifest.nodes:
        if (out_dir / name).is_dir():
            write_file(out_dir / name / CRL, crl, PUBLIC_MODE, replace=True)
            refreshed.append(out_dir / name / CRL)
    return refreshed
