"""Prometheus text metrics for a running node (``[metrics] listen``), and certificate-expiry warnings.

A tiny asyncio HTTP/1.0 server, no dependency: ``GET /metrics`` answers the text exposition format
(version 0.0.4), anything else 404. Each request is bounded (8 KiB of headers, 5 s), the connection closed
after one answer. It has no authentication: bind it to loopback or a private address.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING

from quicmesh.protocol.dates import CERT_WARNING_DAYS, days_left

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


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def cert_warnings(node: NodeView, now: datetime | None = None) -> list[str]:
    """Human warnings for the node's and the CA's certificates expiring in < 30 days (or expired)."""
    warnings = []
    for what, not_after in (("node certificate", node.cert_not_after), ("mesh CA certificate", node.ca_not_after)):
        left = days_left(not_after, now)
        if left < 0:
            warnings.append(f"{what} EXPIRED {-left:.1f} days ago ({not_after.isoformat()})")
        elif left < CERT_WARNING_DAYS:
            warnings.append(f"{what} expires in {left:.1f} days ({not_after.isoformat()}): renew it")
    return warnings


def _failure_reason(reason: str) -> str:
    if reason.startswith("rejected peer certificate"):
        return "peer_certificate_rejected"
    if reason.startswith("peer refused"):
        return "refused_by_peer"
    if reason.startswith("TLS handshake refused"):  # an inbound handshake: its alert may be ours or the client's
        return "inbound_tls_refused"
    return "other"


def render(node: NodeView, now: datetime | None = None) -> str:
    """The node's metrics in the Prometheus text format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    peers = node.peers()
    connected = [p for p in peers if p.state == "connected"]
    node_label = f'node="{_label(node.name)}"'
    metric("quicmesh_peers_connected", "gauge", "Configured peers currently connected.",
           [(f"{{{node_label}}}", len(connected))])
    metric("quicmesh_peers_configured", "gauge", "Configured peers.", [(f"{{{node_label}}}", len(peers))])
    metric("quicmesh_peer_up", "gauge", "1 if the peer is connected.",
           [(f'{{peer="{_label(p.name)}"}}', int(p.state == "connected")) for p in peers])
    metric("quicmesh_peer_rtt_seconds", "gauge", "Smoothed round-trip time to the peer.",
           [(f'{{peer="{_label(p.name)}"}}', float(p.rtt)) for p in connected if p.rtt is not None])
    for name, field, help_text in _PEER_COUNTERS:
        metric(name, "counter", help_text,
               [(f'{{peer="{_label(p.name)}"}}', int((p.counters or {}).get(field, 0))) for p in peers])
    metric("quicmesh_datagrams_dropped_total", "counter", "Datagrams to or from the peer dropped, by reason.",
           [(f'{{peer="{_label(p.name)}",reason="{reason}"}}', int((p.counters or {}).get(f"datagrams_dropped_{reason}", 0)))
            for p in peers for reason in _DATAGRAM_DROP_REASONS])
    reasons = Counter(_failure_reason(reason) for _, _, reason in node.rejections)
    total = node.rejection_count
    if total > sum(reasons.values()):  # older entries fell out of the bounded history
        reasons["other"] += total - sum(reasons.values())
    metric("quicmesh_handshake_failures_total", "counter", "Handshakes refused, by reason.",
           [(f'{{reason="{r}"}}', reasons.get(r, 0)) for r in ("peer_certificate_rejected", "refused_by_peer",
                                                                 "inbound_tls_refused", "other")])
    udp = node.socket_counters()
    metric("quicmesh_udp_packets_total", "counter", "UDP packets through the node's socket.",
           [(f'{{direction="{d}"}}', int(udp[f"packets_{d}"])) for d in ("in", "out")])
    metric("quicmesh_udp_send_errors_total", "counter", "UDP sends that failed (the packet was lost).",
           [("", int(udp["send_errors"]))])
    guard = node.guard_status()
    if guard is not None:
        counters = guard.get("counters", {})
        metric("quicmesh_guard_dropped_total", "counter",
               "Packets or new-connection Initials dropped before aioquic, by reason.",
               [(f'{{reason="{_label(r)}"}}', int(v)) for r, v in counters.items() if r != "retry_sent"])
        metric("quicmesh_guard_retry_sent_total", "counter", "QUIC Retry packets sent.",
               [("", int(counters.get("retry_sent", 0)))])
        metric("quicmesh_pending_handshakes", "gauge", "Accepted connections still handshaking.",
               [("", int(guard.get("pending_handshakes", 0)))])
        metric("quicmesh_stray_packets_total", "counter", "Packets for no connection that were not Initials.",
               [("", int(guard.get("stray_packets", 0)))])
    certs = [("node", node.cert_not_after), ("ca", node.ca_not_after)]
    metric("quicmesh_cert_days_left", "gauge", "Days until the certificate expires (negative: expired).",
           [(f'{{cert="{which}"}}', round(days_left(not_after, now), 3)) for which, not_after in certs])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves :func:`render` for one node over HTTP; ``start()`` binds, ``close()`` stops."""

    def __init__(self, node: NodeView, host: str, port: int) -> None:
        self.node = node
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_REQUEST)
        bound = self._server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        log.info("metrics endpoint on http://%s:%d/metrics", *self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?")[0] == b"/metrics":
                body = render(self.node).encode()
                status = b"200 OK"
                kind = b"text/plain; version=0.0.4; charset=utf-8"
                if parts[0] == b"HEAD":
                    body_out = b""
                else:
                    body_out = body
            else:
                body = body_out = b"not found: try GET /metrics\n"
                status, kind = b"404 Not Found", b"text/plain; charset=utf-8"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body_out)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - one bad scrape must not take the endpoint down
            log.exception("metrics request failed")
        finally:
            writer.close()
