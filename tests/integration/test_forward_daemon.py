"""UDP service forwarding end to end: `quicmesh run` daemons configured by their node.toml only, an
unmodified UDP echo program behind beta, a plain UDP client on alpha; status and SIGHUP reload."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningMesh

from quicmesh.ops.demo import free_udp_ports

HERE = Path(__file__).resolve().parents[1]  # tests/, where the helper scripts live


@pytest.fixture
def echo_port() -> Iterator[int]:
    process = subprocess.Popen([sys.executable, str(HERE / "udp_echo.py")], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on "), line
        yield int(line.split()[-1])
    finally:
        process.kill()
        process.wait(5)


def poll(condition, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)
    return result


def round_trip(port: int, data: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None


def forwarding(cli, mesh: RunningMesh, node: str) -> dict:
    result = cli("status", "--json", "--socket", mesh.socket(node))
    assert result.returncode in (0, 2), result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == 1  # forwarding is additive to schema 1
    return document["forwarding"]


def forward_section(port: int) -> str:
    return f'\n[[forwards]]\nlisten = "127.0.0.1:{port}"\npeer = "beta"\nservice = "echo"\n'


def test_daemons_forward_udp_from_config_only_and_reload(cli, local_mesh, echo_port: int) -> None:
    nodes = {node.name: node for node in local_mesh}
    first, second = free_udp_ports(2)
    beta_toml = nodes["beta"].config.read_text()
    nodes["beta"].config.write_text(
        beta_toml + f'\n[[services]]\nname = "echo"\ntarget = "127.0.0.1:{echo_port}"\nallow = ["alpha"]\n')
    alpha_toml = nodes["alpha"].config.read_text()
    nodes["alpha"].config.write_text(alpha_toml + forward_section(first))
    assert cli("check-config", "-c", str(nodes["alpha"].config)).returncode == 0
    mesh = RunningMesh(local_mesh)
    try:
        mesh.start()
        mesh.wait_healthy()
        poll(lambda: forwarding(cli, mesh, "alpha")["forwards"][0]["state"] == "ready")
        for index in range(5):
            assert round_trip(first, b"ping %d" % index) == b"ping %d" % index
        alpha = forwarding(cli, mesh, "alpha")["forwards"][0]
        assert alpha["listen"] == f"127.0.0.1:{first}" and alpha["max_payload"] == 1165
        assert alpha["counters"]["datagrams_out"] == alpha["counters"]["datagrams_in"] == 5
        assert alpha["flows_active"] == alpha["counters"]["flows_opened"] == 5  # a new client socket each time
        beta = forwarding(cli, mesh, "beta")["services"][0]
        assert (beta["name"], beta["allow"], beta["counters"]["datagrams_in"]) == ("echo", ["alpha"], 5)
        text = cli("status", "--socket", mesh.socket("alpha")).stdout
        assert "FORWARD" in text and f"127.0.0.1:{first}" in text and "beta/echo" in text and "ready" in text
        assert "SERVICE" in cli("status", "--socket", mesh.socket("beta")).stdout

        # SIGHUP: add a second forward, then remove the first.
        nodes["alpha"].config.write_text(alpha_toml + forward_section(first) + forward_section(second))
        mesh.signal("alpha", signal.SIGHUP)
        poll(lambda: len(forwarding(cli, mesh, "alpha")["forwards"]) == 2)
        poll(lambda: round_trip(second, b"second") == b"second")
        nodes["alpha"].config.write_text(alpha_toml + forward_section(second))
        mesh.signal("alpha", signal.SIGHUP)
        poll(lambda: [f["listen"] for f in forwarding(cli, mesh, "alpha")["forwards"]] == [f"127.0.0.1:{second}"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", first))  # the removed forward's socket is closed
        assert round_trip(second, b"still") == b"still"

        # SIGHUP on beta: the service goes; alpha's forward says so and nothing gets through.
        nodes["beta"].config.write_text(beta_toml)
        mesh.signal("beta", signal.SIGHUP)
        poll(lambda: forwarding(cli, mesh, "beta")["services"] == [])
        poll(lambda: forwarding(cli, mesh, "alpha")["forwards"][0]["state"] == "not offered")
        assert round_trip(second, b"gone", timeout=0.5) is None
        assert forwarding(cli, mesh, "alpha")["forwards"][0]["counters"]["refused"] >= 1
    finally:
        codes = mesh.stop(timeout=5)
    assert codes == [0, 0, 0], [mesh.log(name) for name in mesh.processes]


def test_a_forward_port_in_use_stops_the_daemon_with_a_clear_error(cli, local_mesh) -> None:
    nodes = {node.name: node for node in local_mesh}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        nodes["alpha"].config.write_text(nodes["alpha"].config.read_text() + forward_section(port))
        result = cli("run", "-c", str(nodes["alpha"].config), timeout=20)
    assert result.returncode == 1
    assert f"forward 127.0.0.1:{port} -> beta/echo: cannot listen: Address already in use" in result.stderr
