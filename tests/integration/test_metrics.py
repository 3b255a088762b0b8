"""The Prometheus endpoint and its probes, credential warnings, and the guard's line in `quicmesh status`."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

from meshkit import make_mesh
from quicmesh import Node
from quicmesh.ops.credential_watch import CredentialDates
from quicmesh.ops.metrics import MetricsServer, render
from quicmesh.ops.status import build_status, guard_line, header

NO_FEATURES = SimpleNamespace(find=lambda feature_type: None)  # a node with no feature plugged in
from quicmesh.ops.status import render as render_status


async def _get(address: tuple[str, int], path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


async def test_metrics_endpoint_serves_peers_counters_guard_and_certs(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(timeout=10)
        await asyncio.wait_for(alpha.send("beta", b"x"), 5)
        await asyncio.wait_for(beta.recv(), 5)
        server = MetricsServer(beta, "127.0.0.1", 0)
        await server.start()
        try:
            assert server.address is not None
            status, body = await _get(server.address, "/metrics")
            assert status == "HTTP/1.0 200 OK"
            assert 'quicmesh_peers_connected{node="beta"} 1' in body
            assert 'quicmesh_peer_up{peer="alpha"} 1' in body
            assert 'quicmesh_messages_in_total{peer="alpha"} 1' in body
            assert 'quicmesh_guard_dropped_total{reason="not_allowed"} 0' in body
            assert 'quicmesh_handshake_failures_total{reason="peer_certificate_rejected"} 0' in body
            assert 'quicmesh_cert_days_left{cert="node"}' in body and 'quicmesh_cert_days_left{cert="ca"}' in body
            assert "quicmesh_peer_rtt_seconds{peer=\"alpha\"}" in body
            packets_in = [line for line in body.splitlines() if line.startswith('quicmesh_udp_packets_total{direction="in"}')]
            assert len(packets_in) == 1 and float(packets_in[0].rsplit(" ", 1)[1]) > 0
            assert "quicmesh_udp_send_errors_total 0" in body
            for line in body.splitlines():  # every sample line is "name{labels} number"
                if not line.startswith("#"):
                    float(line.rsplit(" ", 1)[1])
            assert (await _get(server.address, "/other"))[0] == "HTTP/1.0 404 Not Found"
            # A client that sends nothing or junk does not break the endpoint.
            _, writer = await asyncio.open_connection(*server.address)
            writer.write(b"\x00" * 100)
            writer.close()
            assert (await _get(server.address, "/metrics"))[0] == "HTTP/1.0 200 OK"
        finally:
            await server.close()
        document = build_status(beta, started=0.0)
        assert document["guard"]["dropped"] == 0 and "ca_days_left" in document
        assert guard_line(document) is None  # nothing dropped: no extra line


def test_credential_warnings_for_node_ca_and_crl() -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    dates = CredentialDates(cert_not_after=now + timedelta(days=10), ca_not_after=now + timedelta(days=400))
    (warning,) = dates.warnings(now)
    assert warning.kind == "cert_expiring" and warning.text.startswith("node certificate expires in 10.0 days")
    dates = CredentialDates(now + timedelta(days=10), now - timedelta(days=2), now - timedelta(hours=36))
    assert [w.kind for w in dates.warnings(now)] == ["cert_expiring", "ca_expired", "crl_stale"]
    assert dates.warnings(now)[1].text.startswith("mesh CA certificate EXPIRED 2.0 days ago")
    assert dates.warnings(now)[2].text.startswith("CRL is stale: past its nextUpdate by 1.5 days")
    fine = CredentialDates(now + timedelta(days=31), now + timedelta(days=31), now + timedelta(days=1))
    assert fine.warnings(now) == []
    text = render(SimpleNamespace(name="solo", peers=lambda: [], rejections=(), rejection_count=0,
                                  guard_status=lambda: None, features=NO_FEATURES,
                                  socket_counters=lambda: {"packets_in": 0, "packets_out": 0, "send_errors": 0}),
                  now=now, dates=dates)
    assert 'quicmesh_credential_warning{kind="crl_stale"} 1.0' in text
    assert 'quicmesh_credential_warning{kind="ca_expiring"} 0.0' in text
    assert "quicmesh_crl_days_left -1.5" in text


def test_render_before_start_without_peers() -> None:
    """A node not started yet has no guard and a socket that counted nothing."""
    expiry = datetime(2030, 1, 1, tzinfo=timezone.utc)
    node = SimpleNamespace(name="solo", peers=lambda: [], cert_not_after=expiry, ca_not_after=expiry,
                           rejections=(), rejection_count=0, guard_status=lambda: None, features=NO_FEATURES,
                           socket_counters=lambda: {"packets_in": 0, "packets_out": 0, "send_errors": 0})
    text = render(node, now=datetime(2029, 12, 31, tzinfo=timezone.utc))
    assert 'quicmesh_peers_connected{node="solo"} 0' in text
    assert 'quicmesh_cert_days_left{cert="node"} 1' in text
    assert "quicmesh_guard_dropped_total" not in text


def test_status_header_shows_guard_drops_and_ca_warning() -> None:
    status = {"node": "a", "mesh": "m", "listen": "x", "peers_connected": 0, "peers_total": 0,
              "cert_days_left": 100.0, "ca_days_left": 5.0,
              "guard": {"dropped": 4, "allowlist": ["10.0.0.0/8"], "retry": True,
                        "counters": {"not_allowed": 3, "rate_source": 1, "retry_sent": 2}}}
    assert "CA cert 5d left WARNING" in header(status)
    assert guard_line(status) == "guard: 4 dropped (not_allowed 3, rate_source 1), allowlist of 1, retry on (2 sent)"
    assert render_status({**status, "peers": []}).splitlines()[-1] == guard_line(status)
