"""Prometheus metrics for a running node (``[metrics] listen``), and its liveness and readiness probes.

The exposition is prometheus_client's (its escaping, number format and content type); the values come
from a custom collector that reads the node's own counters when scraped, so counting costs nothing per
packet. The HTTP side stays a tiny asyncio HTTP/1.0 server on the node's event loop (prometheus_client's
server runs in a thread, which would read the node's state while the loop changes it):

- ``GET /metrics``: the metrics;
- ``GET /healthz``: 200 while the process serves its event loop (a liveness probe);
- ``GET /readyz``: 200 while the ``[health] min_peers`` rule is met, else 503 (a readiness probe).

Each request is bounded (8 KiB of headers, 5 s), the connection closed after one answer. There is no
authentication: bind it to loopback or a private address.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from quicmesh.ops.credential_watch import WARNING_KINDS, CredentialDates
from quicmesh.ops.health import ALL_PEERS, MinPeers, Verdict, verdict
from quicmesh.ops.logs import fields
from quicmesh.protocol.dates import days_left

if TYPE_CHECKING:
    from quicmesh.ops.view import NodeView

log = logging.getLogger("quicmesh.metrics")

_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0

# (metric, PeerCounters field, help)
_PEER_COUNTERS = (
    ("quicmesh_datagrams_in_total", "datagrams_in", "Datagrams received from the peer."),
    ("quicmesh_datagrams_out_total", "datagrams_out", "Datagrams sent to the peer."),
    ("quicmesh_messages_in_total", "messages_in", "Reliable messages received from the peer."),
    ("quicmesh_messages_out_total", "messages_out", "Reliable messages sent to the peer."),
    ("quicmesh_bytes_in_total", "bytes_in", "Payload bytes received from the peer."),
    ("quicmesh_bytes_out_total", "bytes_out", "Payload bytes sent to the peer."),
    ("quicmesh_requests_in_total", "requests_in", "Requests served for the peer."),
    ("quicmesh_requests_out_total", "requests_out", "Requests sent to the peer."),
    ("quicmesh_requests_refused_total", "requests_refused", "Peer's requests refused (in flight or buffer limit)."),
    ("quicmesh_limit_closes_total", "limit_closes", "Connections closed for exceeding limits.max_peer_buffer."),
)

_DATAGRAM_DROP_REASONS = ("queue_full", "disconnected", "inbox_full")
_FAILURE_REASONS = ("peer_certificate_rejected", "refused_by_peer", "inbound_tls_refused", "other")


def _failure_reason(reason: str) -> str:
    if reason.startswith("rejected peer certificate"):
        return "peer_certificate_rejected"
    if reason.startswith("peer refused"):
        return "refused_by_peer"
    if reason.startswith("TLS handshake refused"):  # an inbound handshake: its alert may be ours or the client's
        return "inbound_tls_refused"
    return "other"


def node_dates(node: NodeView) -> CredentialDates:
    """The dates a node itself knows (no CRL's): what a metrics endpoint outside the daemon reports."""
    return CredentialDates(node.cert_not_after, node.ca_not_after)


def _gauge(name: str, help_text: str, labels: tuple[str, ...], samples: list[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _counter(name: str, help_text: str, labels: tuple[str, ...], samples: list[tuple[list[str], float]]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class NodeCollector(Collector):
    """Reads the node when scraped. ``dates`` gives the credentials in force (the daemon's, with the CRL),
    ``min_peers`` the readiness rule; ``now`` fixes the clock (tests)."""

    def __init__(self, node: NodeView, *, dates: Callable[[], CredentialDates] | None = None,
                 min_peers: Callable[[], MinPeers] | None = None, now: datetime | None = None) -> None:
        self.node = node
        self.dates = dates or (lambda: node_dates(node))
        self.min_peers = min_peers or (lambda: ALL_PEERS)
        self.now = now

    def collect(self) -> Iterator[Metric]:
        node = self.node
        peers = node.peers()
        connected = [p for p in peers if p.state == "connected"]
        yield _gauge("quicmesh_peers_connected", "Configured peers currently connected.", ("node",),
                     [([node.name], len(connected))])
        yield _gauge("quicmesh_peers_configured", "Configured peers.", ("node",), [([node.name], len(peers))])
        yield _gauge("quicmesh_peers_required", "Connected peers the [health] min_peers rule requires.", ("node",),
                     [([node.name], self.min_peers().required(len(peers)))])
        yield _gauge("quicmesh_peer_up", "1 if the peer is connected.", ("peer",),
                     [([p.name], int(p.state == "connected")) for p in peers])
        yield _gauge("quicmesh_peer_rtt_seconds", "Smoothed round-trip time to the peer.", ("peer",),
                     [([p.name], p.rtt) for p in connected if p.rtt is not None])
        yield _gauge("quicmesh_peer_relayed", "1 if the peer is reached through a relay (its path is 'via RELAY').",
                     ("peer", "relay"), [([p.name, (p.path or "")[4:]], 1) for p in connected
                                         if (p.path or "").startswith("via ")])
        for name, field, help_text in _PEER_COUNTERS:
            yield _counter(name, help_text, ("peer",), [([p.name], (p.counters or {}).get(field, 0)) for p in peers])
        yield _counter("quicmesh_datagrams_dropped_total", "Datagrams to or from the peer dropped, by reason.",
                       ("peer", "reason"),
                       [([p.name, reason], (p.counters or {}).get(f"datagrams_dropped_{reason}", 0))
                        for p in peers for reason in _DATAGRAM_DROP_REASONS])
        reasons = Counter(_failure_reason(reason) for _, _, reason in node.rejections)
        if node.rejection_count > sum(reasons.values()):  # older entries fell out of the bounded history
            reasons["other"] += node.rejection_count - sum(reasons.values())
        yield _counter("quicmesh_handshake_failures_total", "Handshakes refused, by reason.", ("reason",),
                       [([r], reasons.get(r, 0)) for r in _FAILURE_REASONS])
        udp = node.socket_counters()
        yield _counter("quicmesh_udp_packets_total", "UDP packets through the node's socket.", ("direction",),
                       [([d], udp[f"packets_{d}"]) for d in ("in", "out")])
        yield _counter("quicmesh_udp_send_errors_total", "UDP sends that failed (the packet was lost).", (),
                       [([], udp["send_errors"])])
        yield from self._guard()
        yield from self._relay()
        yield from self._membership()
        yield from self._credentials()

    def _guard(self) -> Iterator[Metric]:
        guard = self.node.guard_status()
        if guard is None:
            return
        counters = guard.get("counters", {})
        yield _counter("quicmesh_guard_dropped_total",
                       "Packets or new-connection Initials dropped before aioquic, by reason.", ("reason",),
                       [([r], v) for r, v in counters.items() if r != "retry_sent"])
        yield _counter("quicmesh_guard_retry_sent_total", "QUIC Retry packets sent.", (),
                       [([], counters.get("retry_sent", 0))])
        yield _gauge("quicmesh_pending_handshakes", "Accepted connections still handshaking.", (),
                     [([], guard.get("pending_handshakes", 0))])
        yield _counter("quicmesh_stray_packets_total", "Packets for no connection that were not Initials.", (),
                       [([], guard.get("stray_packets", 0))])

    def _relay(self) -> Iterator[Metric]:
        from quicmesh.relay.feature import RelayFeature  # light; a running node has it loaded

        relay = self.node.features.find(RelayFeature)
        if relay is None:
            return
        counters = relay.counters
        yield _gauge("quicmesh_relay_circuits", "Circuits through this node (it relays them).", (),
                     [([], relay.status()["circuits_open"])])
        yield _counter("quicmesh_relay_bytes_total", "Bytes this node relayed for others.", (),
                       [([], counters.bytes_relayed)])
        yield _counter("quicmesh_relay_circuits_total", "Circuits this node was asked for, by outcome.", ("outcome",),
                       [(["opened"], counters.circuits_opened), (["refused"], counters.circuits_refused)])
        yield _counter("quicmesh_relay_dropped_total", "Relayed packets dropped, by reason.", ("reason",),
                       [(["over_budget"], counters.dropped_over_budget),
                        (["unknown_circuit"], counters.dropped_unknown_circuit),
                        (["queue_full"], counters.dropped_queue_full)])

    def _membership(self) -> Iterator[Metric]:
        from quicmesh.membership.feature import MembershipFeature  # light; a running node has it loaded

        membership = self.node.features.find(MembershipFeature)
        if membership is None:
            return
        status = membership.status()
        counters = status["counters"]
        rows = status["members"]
        yield _gauge("quicmesh_members", "Members this node knows of (itself not counted), by state.", ("state",),
                     [([state], sum(1 for r in rows if r["state"] == state)) for state in ("alive", "gone")])
        yield _counter("quicmesh_announcements_total", "Membership announcements received, by outcome.",
                       ("outcome",), [(["accepted"], counters["accepted"]), (["replayed"], counters["replayed"])])
        yield _counter("quicmesh_announcements_rejected_total", "Membership announcements refused, by reason.",
                       ("reason",), [([reason], count) for reason, count in sorted(counters["rejected"].items())])
        yield _counter("quicmesh_crl_updates_total", "Newer CRLs applied (from a peer or an operator).", (),
                       [([], counters["crl_updates"])])

    def _credentials(self) -> Iterator[Metric]:
        dates = self.dates()
        yield _gauge("quicmesh_cert_days_left", "Days until the certificate expires (negative: expired).",
                     ("cert",), [([which], round(days_left(not_after, self.now), 3))
                                 for which, not_after in (("node", dates.cert_not_after), ("ca", dates.ca_not_after))])
        if dates.crl_next_update is not None:
            yield _gauge("quicmesh_crl_days_left", "Days until the CRL's nextUpdate (negative: stale).", (),
                         [([], round(days_left(dates.crl_next_update, self.now), 3))])
        active = {warning.kind for warning in dates.warnings(self.now)}
        yield _gauge("quicmesh_credential_warning",
                     "1 while the warning holds: cert/ca expiring (< 30 days) or expired, crl_stale.", ("kind",),
                     [([kind], int(kind in active)) for kind in WARNING_KINDS])


def render(node: NodeView, now: datetime | None = None, dates: CredentialDates | None = None) -> str:
    """The node's metrics in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, dates=(lambda: dates) if dates is not None else None, now=now))
    return generate_latest(registry).decode()


class MetricsServer:
    """Serves the metrics and probes of one node over HTTP; ``start()`` binds, ``close()`` stops."""

    def __init__(self, node: NodeView, host: str, port: int, *, dates: Callable[[], CredentialDates] | None = None,
                 min_peers: Callable[[], MinPeers] | None = None) -> None:
        self.node = node
        self.host, self.port = host, port
        self.collector = NodeCollector(node, dates=dates, min_peers=min_peers)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self.collector)
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_REQUEST)
        bound = self._server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        log.info("metrics listening", extra=fields(event="metrics_listening",
                                                    url=f"http://{self.address[0]}:{self.address[1]}/metrics"))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def readiness(self) -> tuple[bool, str]:
        """Whether the min-peers rule is met, and the line that says so."""
        peers = self.node.peers()
        connected = sum(1 for p in peers if p.state == "connected")
        rule = self.collector.min_peers()
        ready = verdict(connected, len(peers), rule) is not Verdict.CRITICAL
        needed = rule.required(len(peers))
        return ready, (f"{'ready' if ready else 'not ready'}: {connected}/{len(peers)} peers connected, "
                       f"{needed} required (min_peers {rule})\n")

    def answer(self, path: bytes) -> tuple[bytes, bytes, bytes]:
        """(status line, content type, body) for a GET of ``path``."""
        if path == b"/metrics":
            return b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest(self._registry)
        plain = b"text/plain; charset=utf-8"
        if path == b"/healthz":
            return b"200 OK", plain, b"ok\n"
        if path == b"/readyz":
            ready, line = self.readiness()
            return (b"200 OK" if ready else b"503 Service Unavailable"), plain, line.encode()
        return b"404 Not Found", plain, b"not found: try GET /metrics, /healthz or /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD"):
                status, kind, body = self.answer(parts[1].split(b"?")[0])
            else:
                status, kind, body = b"405 Method Not Allowed", b"text/plain; charset=utf-8", b"GET only\n"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                         + (b"" if parts[:1] == [b"HEAD"] else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - one bad scrape must not take the endpoint down
            log.exception("metrics request failed", extra=fields(event="metrics_error"))
        finally:
            writer.close()
