"""`quicmesh status` rendering and health rules, on hand-made status documents."""

from __future__ import annotations

import time
from typing import Any

import pytest

from quicmesh.ops.health import Verdict, parse_min_peers
from quicmesh.ops.status import (exit_code, format_bytes, format_cert, format_duration, format_rtt, problem_summary,
                                 render, status_rule)

NOW = time.time()


def document(*peers: dict[str, Any], days_left: float = 364.2) -> dict[str, Any]:
    connected = sum(p["state"] == "connected" for p in peers)
    return {"schema": 1, "node": "alpha", "mesh": "prod", "listen": "0.0.0.0:4433", "cert_days_left": days_left,
            "peers_connected": connected, "peers_total": len(peers), "healthy": connected == len(peers),
            "time": NOW, "peers": list(peers)}


BETA = {"name": "beta", "state": "connected", "address": "beta.example:4433", "remote_address": "10.0.0.2:4433",
        "rtt": 0.0012, "last_seen": NOW - 2, "last_error": None, "next_retry": None,
        "counters": {"datagrams_in": 10, "datagrams_out": 12, "messages_in": 3, "messages_out": 4,
                     "bytes_in": 3500, "bytes_out": 5 * 2**20, "datagrams_dropped": 7}}
GAMMA = {"name": "gamma", "state": "backoff", "address": "10.0.0.3:4433", "remote_address": None, "rtt": None,
         "last_seen": None, "last_error": "handshake timed out", "next_retry": 1.62, "counters": {}}


def test_table() -> None:
    lines = render(document(BETA, GAMMA)).splitlines()
    assert lines[0] == "node alpha  mesh prod  listen 0.0.0.0:4433  peers 1/2 connected  cert 364d left"
    assert lines[1].split() == ["PEER", "STATE", "ADDRESS", "RTT", "LAST-SEEN", "DGRAM-IN/OUT", "MSG-IN/OUT",
                                "BYTES-IN/OUT", "DROPS", "LAST-ERROR/NEXT-RETRY"]
    assert lines[2].split() == ["beta", "connected", "10.0.0.2:4433", "1.2ms", "2s", "ago", "10/12", "3/4",
                                "3.4", "KiB/5.0", "MiB", "7", "-"]
    assert lines[3].endswith("  handshake timed out, retry in 1.6s")
    for column in ("STATE", "RTT", "DROPS", "LAST-ERROR"):  # aligned
        start = lines[1].index(column)
        assert lines[2][start - 2:start] == lines[3][start - 2:start] == "  " and lines[2][start] != " "


def test_no_peers_is_healthy() -> None:
    status = document()
    assert exit_code(status) == Verdict.OK
    assert render(status).splitlines()[1] == "no peers configured"


def test_exit_codes_and_summary() -> None:
    assert exit_code(None) == Verdict.CRITICAL == 2  # no node answers: the service is down
    assert exit_code(document(BETA)) == Verdict.OK == 0
    assert exit_code(document(BETA, GAMMA)) == Verdict.CRITICAL  # default: every configured peer is needed
    assert exit_code(document(BETA, GAMMA), parse_min_peers("1")) == Verdict.WARNING == 1
    assert exit_code(document(BETA, GAMMA), parse_min_peers("50%")) == Verdict.WARNING
    assert exit_code(document(GAMMA), parse_min_peers("1")) == Verdict.CRITICAL
    assert problem_summary(document(BETA, GAMMA)) == (
        "alpha: 1/2 peers connected (required 2, min_peers 100%); "
        "not connected: gamma (backoff: handshake timed out, retry in 1.6s)")


def test_the_nodes_own_rule_is_used_unless_one_is_given() -> None:
    reported = {**document(BETA, GAMMA), "min_peers": "1"}
    assert status_rule(reported) == parse_min_peers(1)
    assert exit_code(reported) == Verdict.WARNING
    assert exit_code(reported, parse_min_peers("2")) == Verdict.CRITICAL
    assert status_rule(document(BETA), parse_min_peers("3")) == parse_min_peers(3)  # an older node: the fallback
    assert status_rule({**document(BETA), "min_peers": "bogus"}) == parse_min_peers("100%")


@pytest.mark.parametrize("days, text", [
    (364.2, "cert 364d left"),
    (12.4, "cert 12d left WARNING: renew it soon"),
    (0.25, "cert 6h0m left WARNING: renew it soon"),
    (-3.0, "cert EXPIRED 3d ago"),
])
def test_cert_lifetime(days: float, text: str) -> None:
    assert format_cert(days) == text


def test_units() -> None:
    assert [format_rtt(x) for x in (None, 0.0004, 0.0009996, 0.0123, 0.99996, 1.5)] == [
        "-", "400us", "1.0ms", "12.3ms", "1.00s", "1.50s"]
    assert [format_bytes(x) for x in (0, 1023, 3500, 5 * 2**30)] == ["0 B", "1023 B", "3.4 KiB", "5.0 GiB"]
    assert [format_duration(x) for x in (0.4, 12, 300, 7300, 4 * 86400)] == ["0.4s", "12s", "5m", "2h1m", "4d"]


def test_open_membership_gets_one_line_and_a_static_mesh_none() -> None:
    status = document(BETA)
    status["membership"] = {"open": True, "mode": "on-demand", "alive": 41, "gone": 2, "connected": 6}
    assert "members: 41 alive, 2 gone, on-demand mesh (quicmesh members)" in render(status).splitlines()
    status["membership"] = {"open": False, "mode": "full", "alive": 1, "gone": 0, "connected": 1}
    assert not any(line.startswith("members:") for line in render(status).splitlines())


def test_a_node_behind_nat_gets_one_line_where_peers_see_it() -> None:
    status = document(BETA)
    status["nat"] = {"observed": {"alpha": "203.0.113.7:4433", "gamma": "203.0.113.7:4433"},
                     "public": ["203.0.113.7:4433"], "mapping": "endpoint-independent"}
    assert ("nat: seen at 203.0.113.7:4433 by 2 peers, mapping endpoint-independent (docs/NAT.md)"
            in render(status).splitlines())
    status["nat"] = {"observed": {"alpha": status["listen"]}, "public": [status["listen"]], "mapping": "unknown"}
    assert not any(line.startswith("nat:") for line in render(status).splitlines())  # seen where it listens
