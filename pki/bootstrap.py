"""`bootstrap`: a whole mesh in one command, a CA plus one ready-to-run directory per node.

Re-running it is how nodes are added: existing keys and certificates are kept byte for byte, new nodes
get theirs, and the generated files (crl.pem copies, mesh.json) are rewritten to list them all. An existing
node.toml is never rewritten (the operator may have edited it): when it differs from the generated one,
node.toml.new is written beside it instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quicmesh.protocol.identity import NodeIdentity, fingerprint, identity_of, load_certificates
from quicmesh.protocol.names import validate_name

from pki import PkiError
from pki.authority import (
    DEFAULT_CA_DAYS,
    DEFAULT_KEY_TYPE,
    DEFAULT_NODE_DAYS,
    CertificateAuthority,
    check_key_type,
    create_root_ca,
    issue_node_cert,
    normalize_dns_name,
)
from pki.files import PUBLIC_MODE, make_private_dir, write_file
from pki.layout import (
    BOOTSTRAP_CA,
    CA_CERT,
    CRL,
    MANIFEST,
    NODE_CERT,
    NODE_CONFIG,
    NODE_KEY,
    STAGED_SUFFIX,
    MeshManifest,
    read_manifest,
    refresh_crl_copies,
)


@dataclass(frozen=True)
class NodeSpec:
    """A node to bootstrap: its name, and the HOST and PORT its peers dial."""

    name: str
    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def address(self) -> str:
        """What peers dial, as node.toml writes it: ``HOST:PORT`` or ``[v6]:PORT``."""
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"

    @property
    def listen(self) -> str:
        """Where the node listens: every address of its family, on its port."""
        return f"[::]:{self.port}" if self.is_ipv6 else f"0.0.0.0:{self.port}"

    @property
    def host_is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class BootstrapResult:
    """What a bootstrap run did, for the operator's summary."""

    out_dir: Path
    ca_created: bool
    created: tuple[str, ...]
    """Nodes that got a new key and certificate."""
    kept: tuple[str, ...]
    """Nodes whose existing key and certificate were kept."""
    notes: tuple[str, ...]
    configs_written: tuple[str, ...] = ()
    """Nodes whose node.toml was written (it did not exist)."""
    configs_staged: tuple[str, ...] = ()
    """Nodes whose node.toml differs from the generated one: kept as it is, node.toml.new written beside it."""


def parse_node_spec(text: str) -> NodeSpec:
    """``NODE=HOST:PORT`` (HOST an IPv4 address, ``[IPv6]`` or a DNS name) -> NodeSpec."""
    name, equals, address = text.partition("=")
    if not equals:
        raise PkiError(f"expected NODE=HOST:PORT, got {text!r}")
    validate_name(name, "node")
    if name == BOOTSTRAP_CA:
        raise PkiError(f"node name {name!r} is reserved: the bootstrap directory keeps the CA in {BOOTSTRAP_CA}/")
    if address.startswith("["):
        host, bracket, port_text = address[1:].partition("]")
        if not bracket or not port_text.startswith(":") or not _is_ipv6(host):
            raise PkiError(f"node {name}: bad address {address!r}: expected [IPv6]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon or not host:
            raise PkiError(f"node {name}: bad address {address!r}: expected HOST:PORT")
        if ":" in host:
            raise PkiError(f"node {name}: bad address {address!r}: write an IPv6 address in brackets, [v6]:PORT")
        if not _is_ipv4(host):
            host = normalize_dns_name(host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise PkiError(f"node {name}: bad port {port_text!r} in {address!r}: expected 1..65535")
    return NodeSpec(name, str(ipaddress.ip_address(host)) if _is_ipv6(host) else host, int(port_text))


def bootstrap(out_dir: Path | str, mesh: str, specs: Sequence[NodeSpec], *, key_type: str = DEFAULT_KEY_TYPE,
              days: int = DEFAULT_NODE_DAYS, ca_days: int = DEFAULT_CA_DAYS, passphrase: bytes | None = None,
              now: dt.datetime | None = None) -> BootstrapResult:
    """Create (or extend) a mesh in ``out_dir``: ca/, one directory per node, mesh.json."""
    mesh = validate_name(mesh, "mesh")
    check_key_type(key_type)
    if not specs:
        raise PkiError("name at least one node as NODE=HOST:PORT")
    _refuse_duplicates(specs, "on the command line")
    out_dir = make_private_dir(Path(out_dir))
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.mesh != mesh:
        raise PkiError(f"{out_dir} holds mesh {manifest.mesh!r}, not {mesh!r}")
    ca_dir = out_dir / BOOTSTRAP_CA
    ca_created = not (ca_dir / CA_CERT).exists()
    notes: list[str] = []
    if ca_created:
        notes += create_root_ca(ca_dir, mesh, key_type=key_type, days=ca_days, passphrase=passphrase, now=now).notes
    elif (existing := CertificateAuthority.open(ca_dir, with_key=False)).mesh != mesh:
        raise PkiError(f"{ca_dir} is the CA of mesh {existing.mesh!r}, not {mesh!r}")

    nodes = _merge(out_dir, manifest, specs)
    signer: CertificateAuthority | None = None
    created, kept = [], []
    for spec in nodes.values():
        node_dir = out_dir / spec.name
        if _has_credentials(node_dir, NodeIdentity(mesh, spec.name)):
            kept.append(spec.name)
            continue
        signer = signer or CertificateAuthority.open(ca_dir, passphrase)
        alt_names = {"ips": [spec.host]} if spec.host_is_ip else {"dns": [spec.host]}
        notes += issue_node_cert(signer, spec.name, node_dir, days=days, key_type=key_type, now=now,
                                 **alt_names).notes
        created.append(spec.name)

    fingerprints = {name: fingerprint(load_certificates(out_dir / name / NODE_CERT)[0]) for name in nodes}
    written, staged = [], []
    for spec in nodes.values():
        _install_ca_cert(ca_dir, out_dir / spec.name)
        peers = [peer for peer in nodes.values() if peer.name != spec.name]
        outcome = write_node_config(out_dir / spec.name / NODE_CONFIG,
                                    render_node_toml(mesh, spec, peers, fingerprints).encode())
        if outcome == "written":
            written.append(spec.name)
        elif outcome == "staged":
            staged.append(spec.name)
    write_file(out_dir / MANIFEST, render_manifest(mesh, list(nodes.values()), fingerprints).encode(),
               PUBLIC_MODE, replace=True)
    refresh_crl_copies(ca_dir)
    return BootstrapResult(out_dir, ca_created, tuple(created), tuple(kept), tuple(notes), tuple(written),
                           tuple(staged))


def write_node_config(path: Path, content: bytes) -> str:
    """Write a generated node.toml without ever replacing an existing one.

    Returns "written" (there was none), "unchanged" (it already holds ``content``) or "staged" (it differs,
    e.g. after a hand edit or a new peer: ``content`` went to node.toml.new beside it, replacing an older one).
    """
    if not path.exists():
        write_file(path, content, PUBLIC_MODE, replace=False)
        return "written"
    if path.read_bytes() == content:
        return "unchanged"
    write_file(path.with_name(path.name + STAGED_SUFFIX), content, PUBLIC_MODE, replace=True)
    return "staged"


def render_node_toml(mesh: str, node: NodeSpec, peers: Sequence[NodeSpec], fingerprints: dict[str, str]) -> str:
    """A node.toml in the format of docs/CONFIG.md, with ``peers`` as its [[peers]]."""
    lines = [
        f"# node.toml of node {node.name!r} in mesh {mesh!r}: GENERATED by `quicmesh-pki bootstrap`.",
        "# Re-running bootstrap (e.g. to add a node) never rewrites this file: it writes node.toml.new beside it.",
        "# Format and defaults: docs/CONFIG.md. Relative paths resolve against this file's folder.",
        "",
        "[node]",
        f"name = {_toml(node.name)}",
        f"mesh = {_toml(mesh)}",
        f"listen = {_toml(node.listen)}  # UDP address to accept and dial from; peers dial {node.address}",
        "",
        "[tls]",
        f"ca = {_toml(CA_CERT)}  # the mesh CA: the only trust anchor",
        f"cert = {_toml(NODE_CERT)}",
        f"key = {_toml(NODE_KEY)}  # must stay 0600",
        f"crl = {_toml(CRL)}  # refreshed by `quicmesh-pki revoke`; SIGHUP the node to reload it",
        "",
    ]
    for peer in peers:
        lines += [
            "[[peers]]",
            f"name = {_toml(peer.name)}",
            f"address = {_toml(peer.address)}",
            f"# fingerprint = {_toml(fingerprints[peer.name])}  # uncomment to pin {peer.name}'s current certificate",
            "",
        ]
    if not peers:
        lines += ["# No [[peers]] yet: re-run bootstrap with more NODE=HOST:PORT to add them.", ""]
    lines.append("# [limits], [timers], [control] and [log] are omitted: the defaults of docs/CONFIG.md apply.")
    return "\n".join(lines) + "\n"


def render_manifest(mesh: str, nodes: Sequence[NodeSpec], fingerprints: dict[str, str]) -> str:
    """mesh.json: the mesh at a glance, for harnesses and scripts (and for the next bootstrap run)."""
    document = {
        "mesh": mesh,
        "ca": f"{BOOTSTRAP_CA}/{CA_CERT}",
        "nodes": [
            {
                "name": node.name,
                "address": node.address,
                "host": node.host,
                "port": node.port,
                "listen": node.listen,
                "dir": node.name,
                "config": f"{node.name}/{NODE_CONFIG}",
                "fingerprint": fingerprints[node.name],
            }
            for node in nodes
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def _merge(out_dir: Path, manifest: MeshManifest | None, specs: Sequence[NodeSpec]) -> dict[str, NodeSpec]:
    """The nodes of the last run, updated and extended by this run's, in the order they joined."""
    nodes = {}
    for name, address in (manifest.nodes.items() if manifest else ()):
        nodes[name] = parse_node_spec(f"{name}={address}")
    for spec in specs:
        old = nodes.get(spec.name)
        if old is not None and old.host != spec.host and (out_dir / spec.name / NODE_CERT).exists():
            raise PkiError(f"node {spec.name} exists with host {old.host}, which its certificate names; to move it "
                           f"to {spec.host}, remove {out_dir / spec.name} (and revoke its certificate), then re-run")
        nodes[spec.name] = spec
    _refuse_duplicates(list(nodes.values()), f"in {out_dir / MANIFEST} and on the command line")
    return nodes


def _refuse_duplicates(specs: Sequence[NodeSpec], where: str) -> None:
    names: set[str] = set()
    addresses: dict[str, str] = {}
    for spec in specs:
        if spec.name in names:
            raise PkiError(f"node {spec.name} is named twice {where}")
        names.add(spec.name)
        if spec.address in addresses:
            raise PkiError(f"nodes {addresses[spec.address]} and {spec.name} both use {spec.address} {where}")
        addresses[spec.address] = spec.name


def _has_credentials(node_dir: Path, identity: NodeIdentity) -> bool:
    """True if the node already has its key and certificate (then they are kept); refuse a half-made node."""
    key_path, cert_path = node_dir / NODE_KEY, node_dir / NODE_CERT
    if not key_path.exists() and not cert_path.exists():
        return False
    if not (key_path.exists() and cert_path.exists()):
        raise PkiError(f"{node_dir} holds only one of {NODE_KEY} and {NODE_CERT}: remove it to re-create the node")
    found = identity_of(load_certificates(cert_path)[0])
    if found != identity:
        raise PkiError(f"{cert_path} is the certificate of {found.uri}, not of {identity.uri}")
    return True


def _install_ca_cert(ca_dir: Path, node_dir: Path) -> None:
    ca_pem = (ca_dir / CA_CERT).read_bytes()
    target = node_dir / CA_CERT
    if not target.exists():
        write_file(target, ca_pem, PUBLIC_MODE, replace=False)
    elif target.read_bytes() != ca_pem:
        raise PkiError(f"{target} differs from {ca_dir / CA_CERT}: the node was made for another CA; "
                       f"remove {node_dir} to re-create it")


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _toml(text: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these ASCII values)."""
    return json.dumps(text)
