"""Node status: the JSON document the control socket serves, its health verdict, and its table.

The daemon builds the document (``build_status``); clients only read it, so `quicmesh status`,
health checks and scripts all judge health by the same rule (``exit_code``, on quicmesh.ops.health).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from quicmesh import __version__
from quicmesh.ops.health import ALL_PEERS, MinPeers, Verdict, parse_min_peers, verdict
from quicmesh.protocol.addresses import format_address
from quicmesh.protocol.dates import CERT_WARNING_DAYS, days_left

if TYPE_CHECKING:
    from quicmesh.ops.view import NodeView

SCHEMA = 1


def build_status(node: NodeView, *, started: float, control: dict[str, Any] | None = None,
                 min_peers: MinPeers = ALL_PEERS) -> dict[str, Any]:
    """The status document (schema 1) of a running ``Node``; raw numbers, JSON-ready. ``min_peers``: the
    node's [health] rule, so that a client without the config judges as the node does."""
    now = time.time()
    peers = [peer.to_dict() for peer in node.peers()]
    connected = sum(1 for peer in peers if peer.get("state") == "connected")
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "node": node.name,
        "mesh": node.mesh,
        "listen": format_address(node.listen_address),
        "fingerprint": node.fingerprint,
        **_expiry("cert", node.cert_not_after, now),
        "peers_connected": connected,
        "peers_total": len(peers),
        "healthy": connected == len(peers),
        "min_peers": str(min_peers),  # additive to schema 1, like peers_required
        "peers_required": min_peers.required(len(peers)),
        "peers": peers,
        "time": now,
        "uptime": now - started,
        "pid": os.getpid(),
        "version": __version__,
        "control": control or {},
    }
    # Additive to schema 1 (absent on older nodes): forwarding counters when the node forwards UDP,
    # the strangers' drop counters once the node started, and the CA's expiry.
    from quicmesh.forwarding.forwarder import Forwarder  # light (no aioquic); a running node has it loaded

    if (forwarder := node.features.find(Forwarder)) is not None:
        document["forwarding"] = forwarder.status()
    from quicmesh.durable.feature import DurableMessages  # likewise: a node with [storage] has it loaded

    if (durable := node.features.find(DurableMessages)) is not None:
        document["durable"] = durable.status()  # outbox depth, bytes and oldest age per peer; counters
    from quicmesh.relay.feature import RelayFeature  # every running node has it loaded

    if (relay := node.features.find(RelayFeature)) is not None:
        document["relay"] = relay.status()  # circuits through this node, our circuits, refusals by peer
    from quicmesh.nat.feature import NatFeature  # every running node has it loaded

    if (nat := node.features.find(NatFeature)) is not None:
        document["nat"] = nat.status()  # where peers see us, the NAT's mapping, punches and refusals
    from quicmesh.pubsub.feature import PubSub  # every running node has it loaded

    if (pubsub := node.features.find(PubSub)) is not None:
        document["pubsub"] = pubsub.status()  # subscriptions, interest per peer, counters, busiest subjects
    from quicmesh.membership.feature import MembershipFeature  # every running node has it loaded

    if (membership := node.features.find(MembershipFeature)) is not None:
        document["membership"] = membership.summary()  # mode and counts; `quicmesh members` has the list
    if (guard := node.guard_status()) is not None:
        document["guard"] = guard
    return {**document, **_expiry("ca", node.ca_not_after, now)}


def _expiry(which: str, not_after: datetime, now: float) -> dict[str, Any]:
    return {f"{which}_not_after": not_after.astimezone(timezone.utc).isoformat(),
            f"{which}_days_left": days_left(not_after, datetime.fromtimestamp(now, timezone.utc))}


def status_rule(status: dict[str, Any], fallback: MinPeers = ALL_PEERS) -> MinPeers:
    """The min-peers rule the node reports in its status (an older node reports none: ``fallback``)."""
    try:
        return parse_min_peers(status["min_peers"])
    except (KeyError, ValueError):
        return fallback


def exit_code(status: dict[str, Any] | None, rule: MinPeers | None = None) -> Verdict:
    """The `quicmesh status` exit code for a status document: OK, WARNING or CRITICAL by ``rule`` (default:
    the node's own); CRITICAL when the daemon did not answer (``None``), as a service check reports a
    refused connection. UNKNOWN (bad usage, unusable config) is the CLI's to give."""
    if status is None:
        return Verdict.CRITICAL
    return verdict(status["peers_connected"], status["peers_total"], rule or status_rule(status))


# --- human formatting ---------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """Coarse and short, for tables: 0.4s, 12s, 3m, 2h5m, 4d."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds // 60:.0f}m"
    if seconds < 172800:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:.0f}m"
    return f"{seconds // 86400:.0f}d"


def format_rtt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.0009995:  # what would round to 1000us shows as 1.0ms
        return f"{seconds * 1e6:.0f}us"
    if seconds < 0.99995:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def format_bytes(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    scale = 0
    while count >= 1024 and scale < len(units) - 1:
        count /= 1024
        scale += 1
    return f"{count:.0f} B" if scale == 0 else f"{count:.1f} {units[scale]}"


def format_cert(days_left: float) -> str:
    if days_left < 0:
        return f"cert EXPIRED {format_duration(-days_left * 86400)} ago"
    left = f"{days_left:.0f}d" if days_left >= 1 else format_duration(days_left * 86400)
    warning = " WARNING: renew it soon" if days_left < CERT_WARNING_DAYS else ""
    return f"cert {left} left{warning}"


def _ago(then: float | None, now: float) -> str:
    if not then:
        return "-"
    seconds = max(0.0, now - then)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{format_duration(seconds)} ago"


def _problem(peer: dict[str, Any]) -> str:
    """LAST-ERROR/NEXT-RETRY: why a peer is not (or was not) connected, and when it is retried."""
    parts = []
    if peer.get("last_error"):
        parts.append(str(peer["last_error"]))
    if peer.get("state") != "connected" and peer.get("next_retry") is not None:
        parts.append(f"retry in {format_duration(max(0.0, peer['next_retry']))}")
    return ", ".join(parts) or "-"


def peer_row(peer: dict[str, Any], now: float) -> list[str]:
    counters = peer.get("counters") or {}
    connected = peer.get("state") == "connected"
    relayed = connected and str(peer.get("path") or "").startswith("via ")
    return [
        str(peer.get("name", "?")),
        str(peer.get("state", "?")),
        str(peer["path"]) if relayed else  # "via RELAY": the address is the relay's business
        format_address(peer.get("remote_address") if connected and peer.get("remote_address") else peer.get("address")),
        format_rtt(peer.get("rtt")) if connected else "-",
        _ago(peer.get("last_seen"), now),
        f"{counters.get('datagrams_in', 0)}/{counters.get('datagrams_out', 0)}",
        f"{counters.get('messages_in', 0)}/{counters.get('messages_out', 0)}",
        f"{format_bytes(counters.get('bytes_in', 0))}/{format_bytes(counters.get('bytes_out', 0))}",
        str(counters.get("datagrams_dropped", 0)),
        _problem(peer),
    ]


COLUMNS = ["PEER", "STATE", "ADDRESS", "RTT", "LAST-SEEN", "DGRAM-IN/OUT", "MSG-IN/OUT", "BYTES-IN/OUT",
           "DROPS", "LAST-ERROR/NEXT-RETRY"]


def header(status: dict[str, Any]) -> str:
    line = (f"node {status['node']}  mesh {status['mesh']}  listen {status['listen']}  "
            f"peers {status['peers_connected']}/{status['peers_total']} connected  "
            f"{format_cert(status['cert_days_left'])}")
    ca_days = status.get("ca_days_left")
    if ca_days is not None and ca_days < CERT_WARNING_DAYS:
        line += "  CA " + format_cert(ca_days)
    return line


def guard_line(status: dict[str, Any]) -> str | None:
    """Strangers dropped before aioquic (quicmesh/guard.py), by reason; None while nothing was dropped."""
    guard = status.get("guard")
    if not guard or not guard.get("dropped"):
        return None
    counters = guard.get("counters") or {}
    drops = ", ".join(f"{name} {count}" for name, count in counters.items() if count and name != "retry_sent")
    line = f"guard: {guard.get('dropped', 0)} dropped" + (f" ({drops})" if drops else "")
    if guard.get("allowlist") is not None:
        line += f", allowlist of {len(guard['allowlist'])}"
    if guard.get("retry"):
        line += f", retry on ({counters.get('retry_sent', 0)} sent)"
    return line


def _table(rows: list[list[str]]) -> list[str]:
    """Rows aligned in columns two spaces apart; the last column (free text) is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]


def render(status: dict[str, Any]) -> str:
    """The human status: a header line, then one aligned line per peer."""
    now = status.get("time") or time.time()
    lines = [header(status)]
    # "warnings" (additive to schema 1, from the daemon): a stale CRL, certificates near their expiry
    lines += [f"WARNING: {warning.get('message')}" for warning in status.get("warnings") or ()]
    if status["peers"]:
        lines += _table([COLUMNS] + [peer_row(peer, now) for peer in status["peers"]])
    else:
        lines.append("no peers configured")
    lines += render_forwarding(status.get("forwarding") or {})
    if (members := membership_line(status)) is not None:
        lines.append(members)
    if (nat := nat_line(status)) is not None:
        lines.append(nat)
    if (guard := guard_line(status)) is not None:
        lines.append(guard)
    return "\n".join(lines)


def membership_line(status: dict[str, Any]) -> str | None:
    """Open membership in one line (`quicmesh members` lists them); None for a mesh of [[peers]] only."""
    membership = status.get("membership")
    if not membership or not membership.get("open"):
        return None
    return (f"members: {membership.get('alive', 0)} alive, {membership.get('gone', 0)} gone, "
            f"{membership.get('mode', '?')} mesh (quicmesh members)")


def nat_line(status: dict[str, Any]) -> str | None:
    """Where peers see this node when that is not its listen address (behind a NAT, or on a wildcard); else None."""
    nat = status.get("nat") or {}
    public = [address for address in nat.get("public") or () if address != status.get("listen")]
    if not public:
        return None
    return (f"nat: seen at {', '.join(public[:3])} by {len(nat.get('observed') or {})} peers, "
            f"mapping {nat.get('mapping', 'unknown')} (docs/NAT.md)")


SERVICE_COLUMNS = ["SERVICE", "TARGET", "ALLOW", "FLOWS", "DGRAM-IN/OUT", "BYTES-IN/OUT", "DROPS"]
FORWARD_COLUMNS = ["FORWARD", "TO", "STATE", "FLOWS", "DGRAM-OUT/IN", "BYTES-OUT/IN", "DROPS"]


def _drops(counters: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = [f"{key} {counters[key]}" for key in keys if counters.get(key)]
    return ", ".join(parts) or "0"


def render_forwarding(forwarding: dict[str, Any]) -> list[str]:
    """The services and forwards tables of the human status (nothing when none are configured)."""
    lines: list[str] = []
    services, forwards = forwarding.get("services") or [], forwarding.get("forwards") or []
    if services:
        rows = [SERVICE_COLUMNS]
        for service in services:
            c = service.get("counters") or {}
            allow = service.get("allow")
            rows.append([
                str(service.get("name")), str(service.get("target")),
                "*" if allow is None else (",".join(allow) or "nobody"),
                str(service.get("flows_active", 0)),
                f"{c.get('datagrams_in', 0)}/{c.get('datagrams_out', 0)}",
                f"{format_bytes(c.get('bytes_in', 0))}/{format_bytes(c.get('bytes_out', 0))}",
                _drops(c, ("denied", "flows_refused", "oversize", "dropped")),
            ])
        lines += ["", *_table(rows)]
    if forwards:
        rows = [FORWARD_COLUMNS]
        for forward in forwards:
            c = forward.get("counters") or {}
            rows.append([
                str(forward.get("listen")), f"{forward.get('peer')}/{forward.get('service')}",
                str(forward.get("state")), str(forward.get("flows_active", 0)),
                f"{c.get('datagrams_out', 0)}/{c.get('datagrams_in', 0)}",
                f"{format_bytes(c.get('bytes_out', 0))}/{format_bytes(c.get('bytes_in', 0))}",
                _drops(c, ("refused", "unavailable", "flows_refused", "oversize", "dropped")),
            ])
        lines += ["", *_table(rows)]
    unknown = forwarding.get("unknown_service", 0)
    if unknown:
        lines.append(f"forwarded datagrams for services not exposed here: {unknown}")
    return lines


def problem_summary(status: dict[str, Any], rule: MinPeers | None = None) -> str:
    """One line saying which peers are down and why (for `--check` and the demo)."""
    down = [f"{p.get('name')} ({p.get('state')}" + (f": {_problem(p)})" if _problem(p) != "-" else ")")
            for p in status["peers"] if p.get("state") != "connected"]
    rule = rule or status_rule(status)
    head = (f"{status['node']}: {status['peers_connected']}/{status['peers_total']} peers connected "
            f"(required {rule.required(status['peers_total'])}, min_peers {rule})")
    return head + (f"; not connected: {', '.join(down)}" if down else "")
