"""`quicmesh run` with real nodes as real processes on 127.0.0.1, driven through the real CLI.

Traffic tests share one running mesh; tests that signal, reload or stop nodes start their own.
"""

from __future__ import annotations

import base64
import json
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RunningMesh, quicmesh_env

from quicmesh.config import load_config


def listen(mesh: RunningMesh, node: str, *args: str) -> subprocess.Popen[str]:
    """Start `quicmesh listen` on ``node`` and return once it is subscribed (it says so on stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "quicmesh", "listen", "--socket", mesh.socket(node), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quicmesh_env())
    ready, _, _ = select.select([process.stderr], [], [], 10)
    assert ready, "listen did not subscribe within 10s"
    assert "listening on" in process.stderr.readline()
    return process


def poll(condition, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)
    return result


# --- one shared mesh ---------------------------------------------------------------------------------
def test_status_of_a_healthy_mesh(cli, shared_mesh: RunningMesh) -> None:
    alpha = shared_mesh.socket("alpha")
    assert cli("status", "--wait", "10", "--socket", alpha).returncode == 0
    check = cli("status", "--check", "--socket", alpha)
    assert (check.returncode, check.stdout, check.stderr) == (0, "", "")
    document = json.loads(cli("status", "--json", "--socket", alpha).stdout)
    assert document["schema"] == 1 and document["healthy"] is True
    assert (document["node"], document["mesh"], document["peers_connected"], document["peers_total"]) == (
        "alpha", "demo", 2, 2)
    assert {p["name"]: p["state"] for p in document["peers"]} == {"beta": "connected", "gamma": "connected"}
    assert document["listen"] == f"127.0.0.1:{shared_mesh.nodes['alpha'].port}"
    assert 364 < document["cert_days_left"] < 366
    text = cli("status", "--socket", alpha).stdout.splitlines()
    assert text[0].startswith("node alpha  mesh demo  listen 127.0.0.1:") and "peers 2/2 connected" in text[0]
    assert text[1].split()[:3] == ["PEER", "STATE", "ADDRESS"] and len(text) == 4


def test_status_via_config_and_environment(cli, shared_mesh: RunningMesh) -> None:
    assert cli("status", "--check", "-c", str(shared_mesh.nodes["beta"].config)).returncode == 0
    assert cli("status", "--check", env={"QUICMESH_CONTROL_SOCKET": shared_mesh.socket("gamma")}).returncode == 0


def test_datagrams(cli, shared_mesh: RunningMesh) -> None:
    listener = listen(shared_mesh, "beta", "--count", "3", "--timeout", "10", "--kind", "datagram")
    result = cli("send", "--socket", shared_mesh.socket("alpha"), "--datagram", "--lines", "beta", "-",
                 input="one\ntwo\nthree\n")
    assert result.returncode == 0, result.stderr
    assert "sent 3 datagrams to beta" in result.stderr
    out, err = listener.communicate(timeout=15)
    assert listener.returncode == 0, err
    assert out.splitlines() == ["alpha datagram one", "alpha datagram two", "alpha datagram three"]


def test_a_message_with_binary_data_from_stdin(cli, shared_mesh: RunningMesh) -> None:
    listener = listen(shared_mesh, "gamma", "--count", "2", "--timeout", "10")
    assert cli("send", "--socket", shared_mesh.socket("beta"), "gamma", "héllo wörld").returncode == 0
    assert cli("send", "--socket", shared_mesh.socket("beta"), "gamma", "-", input="\x00\x01\n").returncode == 0
    out, _ = listener.communicate(timeout=15)
    assert out.splitlines() == ["beta message héllo wörld", "beta message hex:00010a"]


def test_200_messages_line_by_line_arrive_exactly_once(cli, shared_mesh: RunningMesh) -> None:
    listener = listen(shared_mesh, "alpha", "--json", "--count", "200", "--timeout", "20", "--kind", "message")
    lines = [f"message {i}" for i in range(200)]
    result = cli("send", "--socket", shared_mesh.socket("gamma"), "--lines", "alpha", "-",
                 input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "sent 200 messages to alpha" in result.stderr and "all acknowledged" in result.stderr
    out, err = listener.communicate(timeout=25)
    assert listener.returncode == 0, err
    received = [json.loads(line) for line in out.splitlines()]
    assert {(r["peer"], r["kind"]) for r in received} == {("gamma", "message")}
    assert sorted(base64.b64decode(r["data"]).decode() for r in received) == sorted(lines)


def test_request_is_echoed_without_an_application(cli, shared_mesh: RunningMesh) -> None:
    result = cli("request", "--socket", shared_mesh.socket("alpha"), "beta", "ping", "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, "ping")


@pytest.mark.parametrize("args, expected", [
    (["send", "zeta", "x"], "'zeta' is not a configured peer or known member of alpha"),
    # Larger than any packet (path MTU discovery may have grown alpha's to 16 KiB on loopback by now).
    (["send", "--datagram", "beta", "x" * 20_000], "datagram of 20000 bytes exceeds max_datagram_payload"),
    (["request", "zeta", "x"], "'zeta' is not a configured peer or known member of alpha"),
])
def test_send_errors_are_one_line(cli, shared_mesh: RunningMesh, args: list[str], expected: str) -> None:
    result = cli(*args[:1], "--socket", shared_mesh.socket("alpha"), *args[1:])
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("quicmesh: error: ") and expected in result.stderr


def test_send_lines_stops_at_the_first_failure_while_stdin_stays_open(shared_mesh: RunningMesh) -> None:
    process = subprocess.Popen([sys.executable, "-m", "quicmesh", "send", "--socket", shared_mesh.socket("alpha"),
                                "--lines", "zeta", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=quicmesh_env())
    process.stdin.write(b"one\n")
    process.stdin.flush()
    try:
        assert process.wait(timeout=10) == 1
        assert process.stderr.read().decode().startswith("quicmesh: error: line 1: 'zeta' is not a configured peer")
    finally:
        process.kill()
        process.wait()
        process.stdin.close()
        process.stderr.close()


def test_listen_times_out_with_exit_1(cli, shared_mesh: RunningMesh) -> None:
    started = time.monotonic()
    result = cli("listen", "--socket", shared_mesh.socket("gamma"), "--count", "1", "--timeout", "0.5")
    assert result.returncode == 1 and result.stdout == ""
    assert time.monotonic() - started < 5


def test_ready_and_peer_log_lines_without_key_material(cli, shared_mesh: RunningMesh) -> None:
    fingerprint = shared_mesh.status("alpha")["fingerprint"]
    assert fingerprint == next(p["fingerprint"] for p in shared_mesh.status("beta")["peers"] if p["name"] == "alpha")
    log = shared_mesh.log("alpha")
    [ready] = [line for line in log.splitlines() if " ready " in line]
    assert "node=alpha" in ready and "mesh=demo" in ready and f"fingerprint={fingerprint}" in ready
    assert f"listen=127.0.0.1:{shared_mesh.nodes['alpha'].port}" in ready
    connected = [line for line in log.splitlines() if "peer connected" in line]
    assert {line.split("peer=")[1].split()[0] for line in connected} == {"beta", "gamma"}
    assert all("fingerprint=sha256:" in line for line in connected)
    key = shared_mesh.nodes["alpha"].config.with_name("node.key").read_text()
    assert "PRIVATE KEY" not in log and key.splitlines()[1] not in log


def test_a_second_daemon_for_the_same_node_is_refused(cli, shared_mesh: RunningMesh) -> None:
    result = cli("run", "-c", str(shared_mesh.nodes["alpha"].config), timeout=15)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "Address already in use" in result.stderr or "already running" in result.stderr
    assert cli("status", "--check", "--socket", shared_mesh.socket("alpha")).returncode == 0


# --- nodes of their own --------------------------------------------------------------------------------
def test_sigterm_stops_cleanly_and_peers_notice(cli, running_mesh: RunningMesh) -> None:
    started = time.monotonic()
    assert running_mesh.stop("gamma") == [0]
    assert time.monotonic() - started < 5
    assert not running_mesh.nodes["gamma"].socket.exists()
    assert " stopped " in running_mesh.log("gamma")
    poll(lambda: running_mesh.status("alpha")["peers_connected"] == 1)
    result = cli("status", "--socket", running_mesh.socket("alpha"))
    assert result.returncode == 2 and "peers 1/2 connected" in result.stdout
    check = cli("status", "--check", "--socket", running_mesh.socket("alpha"))
    assert check.returncode == 2 and check.stdout == "" and "gamma" in check.stderr
    assert poll(lambda: "peer disconnected" in running_mesh.log("alpha"))
    assert cli("status", "--socket", running_mesh.socket("gamma")).returncode == 2  # CRITICAL: no answer


def test_sighup_after_revoke_drops_only_the_revoked_node(cli, running_mesh: RunningMesh, mesh_dir: Path) -> None:
    before = {p["name"]: p["connected_since"] for p in running_mesh.status("alpha")["peers"]}
    revoke = subprocess.run([str(Path(sys.executable).with_name("quicmesh-pki")), "revoke", "gamma",
                             "--ca-dir", str(mesh_dir / "ca")], capture_output=True, text=True, timeout=30)
    assert revoke.returncode == 0, revoke.stderr
    for name in ("alpha", "beta", "gamma"):
        running_mesh.signal(name, signal.SIGHUP)

    def gamma_gone(name: str) -> dict | None:
        document = running_mesh.status(name)
        states = {p["name"]: p["state"] for p in document["peers"]}
        return document if states["gamma"] != "connected" else None

    alpha = poll(lambda: gamma_gone("alpha"))
    poll(lambda: gamma_gone("beta"))
    beta = next(p for p in alpha["peers"] if p["name"] == "beta")
    assert beta["state"] == "connected" and beta["connected_since"] == before["beta"]  # not redialed
    assert cli("status", "--socket", running_mesh.socket("beta")).returncode == 2
    assert "reloaded" in running_mesh.log("alpha")
    # gamma's own certificate is revoked: its reload fails and it keeps running on the old config.
    assert poll(lambda: "reload failed" in running_mesh.log("gamma"))
    assert cli("status", "--socket", running_mesh.socket("gamma")).returncode == 2


def test_sighup_with_a_broken_config_keeps_the_old_one(cli, running_mesh: RunningMesh) -> None:
    config = running_mesh.nodes["alpha"].config
    config.write_text(config.read_text() + "\n[bogus]\n")
    running_mesh.signal("alpha", signal.SIGHUP)
    assert poll(lambda: "reload failed" in running_mesh.log("alpha"))
    assert "unknown section" in running_mesh.log("alpha")
    assert cli("status", "--check", "--socket", running_mesh.socket("alpha")).returncode == 0


def test_systemd_notifications(local_mesh, tmp_path: Path) -> None:
    alpha = local_mesh[0]
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify_path))
        systemd.settimeout(10)
        env = quicmesh_env({"NOTIFY_SOCKET": str(notify_path)})
        with open(alpha.log, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "quicmesh", "run", "-c", str(alpha.config)],
                                       stdout=log, stderr=log, env=env)
        try:
            assert systemd.recv(4096).startswith(b"READY=1\nSTATUS=alpha: 0/2 peers connected")
            process.send_signal(signal.SIGHUP)
            assert systemd.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert systemd.recv(4096).startswith(b"READY=1")
            process.send_signal(signal.SIGTERM)
            assert systemd.recv(4096) == b"STOPPING=1"
            assert process.wait(5) == 0
        finally:
            process.kill()


def test_control_socket_from_the_environment_and_json_logs(cli, local_mesh, tmp_path: Path) -> None:
    mesh = RunningMesh(local_mesh[:1])
    path = tmp_path / "env.sock"
    with open(local_mesh[0].log, "wb") as log:
        mesh.processes["alpha"] = subprocess.Popen(
            [sys.executable, "-m", "quicmesh", "run", "-c", str(local_mesh[0].config), "--log-format", "json"],
            stdout=log, stderr=log, env=quicmesh_env({"QUICMESH_CONTROL_SOCKET": str(path)}))
    try:
        poll(lambda: path.exists())
        assert cli("status", "--socket", str(path)).returncode == 2  # peers are not running
        assert not local_mesh[0].socket.exists()
    finally:
        assert mesh.stop() == [0]
    entries = [json.loads(line) for line in local_mesh[0].log.read_text().splitlines()]
    assert any(e["msg"] == "ready" and e["node"] == "alpha" and e["control"] == str(path) for e in entries)


def test_check_config_on_a_bootstrap_output(cli, local_mesh) -> None:
    result = cli("check-config", "-c", str(local_mesh[0].config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("OK: node alpha in mesh demo; cert sha256:")
    assert load_config(local_mesh[0].config).node.name == "alpha"
    report = json.loads(cli("check-config", "--json", "-c", str(local_mesh[0].config)).stdout)
    assert report["ok"] and report["node"] == "alpha" and report["fingerprint"].startswith("sha256:")


def test_check_config_refuses_another_nodes_certificate(cli, local_mesh) -> None:
    alpha, beta = local_mesh[0].config.parent, local_mesh[1].config.parent
    (alpha / "node.crt").write_bytes((beta / "node.crt").read_bytes())
    result = cli("check-config", "-c", str(alpha / "node.toml"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("quicmesh: error: ") for line in lines)
    assert "tls.key:" in lines[0] and "is not the key of the certificate" in lines[0]
    assert "tls.cert:" in lines[1] and "quicmesh://demo/beta" in lines[1]


def test_check_config_refuses_a_revoked_certificate(cli, local_mesh, mesh_dir: Path) -> None:
    revoke = subprocess.run([str(Path(sys.executable).with_name("quicmesh-pki")), "revoke", "alpha",
                             "--ca-dir", str(mesh_dir / "ca")], capture_output=True, text=True, timeout=30)
    assert revoke.returncode == 0, revoke.stderr
    result = cli("check-config", "-c", str(local_mesh[0].config))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("quicmesh: error: tls.cert:") and "revoked" in line
