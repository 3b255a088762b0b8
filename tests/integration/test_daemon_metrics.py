"""The daemon wires [metrics] and certificate-expiry warnings (in-process, one node, no peers up)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest

from meshkit import make_mesh
from quicmesh.ops import logs
from quicmesh.config import Address, MetricsSection
from quicmesh.ops.daemon import Daemon


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    yield stream
    logging.getLogger().removeHandler(logs._handler)
    logs._handler = None


async def test_daemon_serves_metrics_and_warns_of_a_cert_expiring_soon(tmp_path: Path, log_stream, monkeypatch) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"], days=10)  # node certs expire in 10 days
    config = dataclasses.replace(configs["alpha"], metrics=MetricsSection(listen=Address("127.0.0.1", 0)))
    monkeypatch.setattr(logs, "setup", lambda level, fmt, stream=None, _real=logs.setup: _real(level, fmt, log_stream))
    daemon = Daemon(tmp_path / "mesh" / "alpha" / "node.toml", config)
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            while daemon.metrics is None or daemon.metrics.address is None:
                assert not task.done()
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection(*daemon.metrics.address)
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            body = (await reader.read()).decode()
            writer.close()
        assert body.startswith("HTTP/1.0 200 OK")
        assert 'quicmesh_peers_configured{node="alpha"} 1' in body
        document = json.loads(json.dumps(daemon.control.status()))  # what `quicmesh status --json` prints
        assert document["schema"] == 1
        assert document["guard"]["counters"]["not_allowed"] == 0 and document["guard"]["max_pending_handshakes"] == 256
        assert document["ca_days_left"] > 30 and document["cert_days_left"] < 11
        await asyncio.sleep(0.05)
        assert "node certificate expires in 9." in log_stream.getvalue() or \
            "node certificate expires in 10." in log_stream.getvalue(), log_stream.getvalue()
    finally:
        daemon._stop.set()
        assert await asyncio.wait_for(task, 10) == 0
    assert daemon.metrics is not None and daemon.metrics._server is None
