"""The resolved node config: frozen dataclasses whose defaults are the config's defaults (docs/CONFIG.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quicmesh.ops.health import ALL_PEERS, MinPeers
from quicmesh.protocol import wire
from quicmesh.protocol.addresses import host_port

# aioquic allows 128 concurrent streams per direction; the transport keeps a few for control/requests.
MAX_MESSAGE_WINDOW = 120
MAX_MESSAGE_SIZE = 1 << 30
# Upper bounds that are not in the doc's prose but keep absurd values from overflowing downstream
# (deque maxlen, QUIC varint of the idle timeout in ms).
MAX_DATAGRAM_QUEUE = 1_000_000
MAX_SECONDS = 86_400.0
MAX_FLOWS_PER_PEER = wire.MAX_FLOW_ID + 1  # one flow per flow id


# --- the resolved config ------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """A UDP endpoint as written; a DNS host name stays a name, resolved at each dial (not here)."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class NodeSection:
    name: str
    mesh: str
    listen: Address


@dataclass(frozen=True)
class TlsSection:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None
    denylist: tuple[str, ...] = ()  # normalized "sha256:<64 lower-case hex>"


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: Address
    fingerprint: str | None = None  # normalized pin, like TlsSection.denylist


@dataclass(frozen=True)
class Limits:
    max_datagram_size: int = 1200
    max_message_size: int = 16 * 1024 * 1024
    datagram_queue: int = 1024
    message_window: int = 64
    max_requests_in_flight: int = 64
    # Bytes one peer may have buffered here: its partly received messages plus those held unacknowledged
    # while the application is behind (over it: connection closed, RESOURCE_LIMIT); the same bound caps
    # partly received requests (over it: that request refused, OVERLOADED). Senders keep at most half
    # of it unacknowledged, so a peer with the same setting never trips it.
    max_peer_buffer: int = 64 * 1024 * 1024
    max_inbox_bytes: int = 64 * 1024 * 1024  # received, not yet read by the application (node-wide)
    max_flows_per_peer: int = 256  # forwarded UDP flows per peer, each way (new flows over it are dropped)
    forward_idle_timeout: float = 60.0  # seconds without traffic before a forwarded UDP flow is closed


@dataclass(frozen=True)
class Timers:
    """All in seconds; the peer manager's timers (runtime/peer_manager.py)."""

    keepalive: float = 1.0  # ping a connection quiet for this long
    dead_after: float = 3.0  # close a connection silent for this long
    backoff_min: float = 0.2
    backoff_max: float = 10.0
    handshake_timeout: float = 5.0  # limit for a dial or inbound connection to become ready

    def __post_init__(self) -> None:
        # Positive delays guarantee that the peer manager's poll() always moves its next deadline past now
        # (no busy loop), whoever builds a Timers: the config parser reports these with the key path first.
        for name in ("keepalive", "dead_after", "backoff_min", "backoff_max", "handshake_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Timers.{name} must be a positive number of seconds, got {value!r}")
        if self.backoff_max < self.backoff_min:
            raise ValueError(f"Timers.backoff_max ({self.backoff_max}) < backoff_min ({self.backoff_min})")


@dataclass(frozen=True)
class ControlSection:
    socket: Path


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class SecuritySection:
    """Strangers (quicmesh/guard.py): source allowlist, handshake rate limits, pending cap, QUIC Retry."""

    allowlist: tuple[str, ...] | None = None  # CIDRs; None (key left out): no allowlist unless allowlist_peers
    allowlist_peers: bool = False  # also allow the configured peers' (resolved) addresses
    retry: bool = False  # QUIC Retry address validation (+1 round trip per handshake)
    handshake_rate_per_source: float = 20.0  # new handshakes per second from one IP address (0: no limit)
    handshake_burst_per_source: int = 50
    handshake_rate: float = 200.0  # new handshakes per second, node-wide (0: no limit)
    handshake_burst: int = 400
    max_pending_handshakes: int = 256  # handshakes in progress at once (0: no limit)


@dataclass(frozen=True)
class MetricsSection:
    listen: Address | None = None  # Prometheus text endpoint, e.g. "127.0.0.1:9464"; None: off


@dataclass(frozen=True)
class HealthSection:
    """What "healthy" and "ready" mean (quicmesh.ops.health): `quicmesh status` and /readyz judge by it."""

    min_peers: MinPeers = ALL_PEERS  # "N" peers or "P%" of the configured ones; default every configured peer


@dataclass(frozen=True)
class StorageSection:
    """Durable messages (quicmesh/durable, docs/DURABLE.md): off unless ``path`` is set."""

    path: Path | None = None  # the SQLite database (WAL mode); None: no durable messages
    sync: str = "normal"  # "normal": survives a crash of the process; "full": also a power loss (fsync per commit)
    max_messages: int = 1_000_000  # pending in the outbox, all peers (also: received, not yet acknowledged)
    max_bytes: int = 1 << 30
    max_peer_messages: int = 100_000  # pending in the outbox for one peer
    max_peer_bytes: int = 256 << 20
    ttl: float | None = None  # seconds a durable message may wait before it expires; None: never


@dataclass(frozen=True)
class RelaySection:
    """Relaying through a third node when a direct path fails (quicmesh/relay, docs/RELAY.md). On by default:
    a relay sees only the end nodes' encrypted QUIC packets, and the budgets bound what it spends."""

    serve: bool = True  # relay circuits for other nodes
    use: bool = True  # reach a peer through a relay when the direct path to it fails
    allow: tuple[str, ...] | None = None  # peers that may relay through this node; None (left out): every peer
    max_circuits: int = 64  # circuits through this node at once
    max_circuits_per_peer: int = 8  # circuits one peer may have through this node
    max_bytes_per_second: float = 10_000_000.0  # relayed bytes per second from one peer (over it: dropped, counted)


@dataclass(frozen=True)
class MeshSection:
    """Membership (quicmesh/membership, docs/MEMBERSHIP.md): who may join, how to find the mesh, how many
    connections to hold. The default is today's static mesh: only the [[peers]] of this file."""

    members: str = "configured"  # "configured": only [[peers]]; "any-certified": any node with a cert of this mesh
    seeds: tuple[Address, ...] = ()  # dialed without knowing their names (DNS names allowed); any member can be one
    advertise: tuple[Address, ...] = ()  # addresses announced; (): the listen address, or the host's if a wildcard
    connect: str = "auto"  # "full" | "on-demand" | "auto": full mesh up to full_mesh_max members, on demand above
    full_mesh_max: int = 64
    neighbors: int = 4  # on-demand: members kept connected for gossip, besides the seeds
    idle_close: float = 60.0  # on-demand: close a connection without application traffic for this long
    announce_interval: float = 30.0  # re-announce (a new version) this often
    member_timeout: float = 120.0  # a member not heard from (no newer announcement, no connection) this long: gone
    gossip_interval: float = 1.0  # one anti-entropy sync with one random connected member this often
    max_members: int = 10_000
    announce_rate: float = 50.0  # announcements accepted per second from one peer (token bucket)
    announce_burst: int = 500

    @property
    def open(self) -> bool:
        """Whether nodes not in [[peers]] may join (members = "any-certified")."""
        return self.members == "any-certified"


@dataclass(frozen=True)
class NatSection:
    """NAT traversal (quicmesh/nat, docs/NAT.md): learning our public address from peers and hole punching
    through a rendezvous peer. Mappings are kept open by ``timers.keepalive`` (1 s by default, far below the
    30 s that the shortest common NAT UDP timeouts allow)."""

    punch: bool = True  # when a direct dial fails, ask a peer connected to both sides to get both dialing at once
    rendezvous: bool = True  # tell peers their observed address and coordinate punches for them
    dial_private: bool = False  # also dial private (non-global) addresses peers report; loopback/multicast never
    punch_rate: float = 1.0  # punches per second one peer may ask of this node, or offer to it (token bucket)
    punch_burst: int = 4


@dataclass(frozen=True)
class PubSubPeer:
    """One peer's pub/sub permissions (docs/PUBSUB.md); a list left out takes the [pubsub] default."""

    name: str
    publish: tuple[str, ...] | None = None  # subject patterns the peer may publish to this node
    subscribe: tuple[str, ...] | None = None  # patterns the peer may subscribe to from this node


@dataclass(frozen=True)
class PubSubSection:
    """Subjects (quicmesh/pubsub, docs/PUBSUB.md): what peers may publish here and subscribe to from here,
    and the bounds on what a peer may make this node remember."""

    publish: tuple[str, ...] = (">",)  # default for peers not in ``peers``: everything
    subscribe: tuple[str, ...] = (">",)
    peers: tuple[PubSubPeer, ...] = ()
    max_interest_per_peer: int = 10_000  # (pattern, queue group) entries one peer may have here
    interest_rate: float = 100.0  # Interest frames per second from one peer (over it: refused, resynced later)
    interest_burst: int = 200
    max_pending: int = 8192  # messages a subscription holds unread (datagrams over it dropped, messages wait)

    def permissions(self, peer: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(publish, subscribe) patterns for ``peer``."""
        listed = next((p for p in self.peers if p.name == peer), None)
        if listed is None:
            return self.publish, self.subscribe
        return (self.publish if listed.publish is None else listed.publish,
                self.subscribe if listed.subscribe is None else listed.subscribe)


@dataclass(frozen=True)
class ServiceConfig:
    """A local UDP service this node exposes to its peers, by name (docs/FORWARDING.md)."""

    name: str
    target: Address  # where datagrams of the service go: the only addresses forwarding ever sends to
    allow: tuple[str, ...] | None = None  # peers that may use it; None (key left out): every peer


@dataclass(frozen=True)
class ForwardConfig:
    """A local UDP port whose datagrams go to ``service`` on ``peer``."""

    listen: Address
    peer: str
    service: str


@dataclass(frozen=True)
class Config:
    """A node's whole config, validated and resolved: what the node, the CLI and reloads work from."""

    node: NodeSection
    tls: TlsSection
    peers: tuple[PeerConfig, ...]
    limits: Limits
    timers: Timers
    control: ControlSection
    log: LogSection
    security: SecuritySection = SecuritySection()
    metrics: MetricsSection = MetricsSection()
    storage: StorageSection = StorageSection()
    health: HealthSection = HealthSection()
    relay: RelaySection = RelaySection()
    pubsub: PubSubSection = PubSubSection()
    mesh: MeshSection = MeshSection()
    nat: NatSection = NatSection()
    services: tuple[ServiceConfig, ...] = ()
    forwards: tuple[ForwardConfig, ...] = ()
    path: Path | None = None  # the file it was loaded from; not a config key

    def peer(self, name: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Resolved values as plain data; unset optional keys are left out (TOML has no null)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "path"}


def _plain(value: Any) -> Any:
    if isinstance(value, (Path, Address)):
        return str(value)
    if isinstance(value, MinPeers):  # as written in TOML: 3 or "75%"
        return value.count if value.count is not None else str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        pairs = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {k: _plain(v) for k, v in pairs if v is not None}
    return value
