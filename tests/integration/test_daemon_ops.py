"""The daemon's operator manners, with real nodes as `quicmesh run` processes on 127.0.0.1: TLS files
reloaded when they change on disk (no signal), credential warnings, structured log events, /healthz and
/readyz on the metrics listener, and the systemd watchdog."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import RunningMesh, poll, quicmesh_env

from pki.authority import CertificateAuthority, update_crl
from quicmesh.ops.control import NodeUnreachableError
from quicmesh.ops.credential_watch import POLL_INTERVAL
from quicmesh.ops.demo import LocalNode

CUT_WITHIN = 4 * POLL_INTERVAL  # the poll, the settle delay, the reload and the close, with room for a slow CI


def events(log: str, name: str) -> list[str]:
    """The text log lines of one event."""
    return [line for line in log.splitlines() if f" event={name} " in line + " "]


def states(mesh: RunningMesh, node: str) -> dict[str, str]:
    return {p["name"]: p["state"] for p in mesh.status(node)["peers"]}


def connected(mesh: RunningMesh, node: str) -> int:
    """How many peers ``node`` has connected; 0 while its daemon does not answer yet."""
    try:
        return mesh.status(node)["peers_connected"]
    except NodeUnreachableError:
        return 0


def pki(*args: str) -> None:
    done = subprocess.run([str(Path(sys.executable).with_name("quicmesh-pki")), *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def configure(node_toml: Path, *, min_peers: str | int) -> None:
    """Metrics on a port of the kernel's choosing (the log says which), and a [health] rule."""
    text = node_toml.read_text()
    if 'listen = "127.0.0.1:0"' not in text:
        text = text.replace("[metrics]\n", '[metrics]\nlisten = "127.0.0.1:0"\n')
    node_toml.write_text(re.sub(r"(?m)^min_peers = .*$", f"min_peers = {json.dumps(min_peers)}", text))


def metrics_address(mesh: RunningMesh, node: str) -> tuple[str, int]:
    line = poll(lambda: events(mesh.log(node), "metrics_listening"))[0]
    host, port = re.search(r"url=http://([0-9.]+):(\d+)/metrics", line).groups()
    return host, int(port)


def get(address: tuple[str, int], path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection(*address, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_a_crl_replaced_on_disk_cuts_the_revoked_peer_without_a_signal(running_mesh: RunningMesh,
                                                                       mesh_dir: Path) -> None:
    before = {p["name"]: p["connected_since"] for p in running_mesh.status("alpha")["peers"]}
    started = time.monotonic()
    pki("revoke", "gamma", "--ca-dir", str(mesh_dir / "ca"))  # renames a new crl.pem into each node's folder
    poll(lambda: states(running_mesh, "alpha")["gamma"] != "connected", timeout=CUT_WITHIN)
    poll(lambda: states(running_mesh, "beta")["gamma"] != "connected", timeout=CUT_WITHIN)
    print(f"revoked gamma cut by alpha and beta {time.monotonic() - started:.1f}s after the CRL was replaced")
    alpha = running_mesh.status("alpha")
    beta = next(p for p in alpha["peers"] if p["name"] == "beta")
    assert beta["state"] == "connected" and beta["connected_since"] == before["beta"]  # not redialed
    log = running_mesh.log("alpha")
    [reload] = events(log, "reload")
    assert "result=ok" in reload and "trigger=file" in reload and "crl.pem" in reload
    [rejected] = events(log, "peer_rejected")
    assert "peer=gamma" in rejected and "revoked" in rejected
    # gamma redials and is refused at the handshake from now on; its own (revoked) certificate cannot be
    # reloaded, so it keeps the old credentials and says why, once.
    assert poll(lambda: events(running_mesh.log("alpha"), "handshake_rejected"))
    assert poll(lambda: events(running_mesh.log("gamma"), "reload"))
    time.sleep(2 * POLL_INTERVAL)
    [failed] = events(running_mesh.log("gamma"), "reload")
    assert "result=failed" in failed and "revoked" in failed and "trigger=file" in failed


def test_a_broken_file_is_logged_and_the_old_credentials_stay(running_mesh: RunningMesh) -> None:
    crl = running_mesh.nodes["alpha"].config.with_name("crl.pem")
    good = crl.read_bytes()
    broken = crl.with_name("crl.pem.tmp")
    broken.write_bytes(good[: len(good) // 2])  # a copy cut short
    os.replace(broken, crl)
    [failed] = poll(lambda: events(running_mesh.log("alpha"), "reload"), timeout=CUT_WITHIN)
    assert "result=failed" in failed and "crl.pem" in failed
    assert running_mesh.status("alpha")["peers_connected"] == 2
    crl.write_bytes(good)  # written in place this time: the watch sees that too
    ok = poll(lambda: [line for line in events(running_mesh.log("alpha"), "reload") if "result=ok" in line],
              timeout=CUT_WITHIN)
    assert len(ok) == 1 and running_mesh.status("alpha")["peers_connected"] == 2


def test_stale_crl_warning_in_log_status_and_metrics(cli, local_mesh, mesh_dir: Path) -> None:
    last_month = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    update_crl(CertificateAuthority.open(mesh_dir / "ca"), now=last_month, days=1)  # nextUpdate 29 days ago
    configure(local_mesh[0].config, min_peers="100%")
    mesh = RunningMesh(local_mesh[:1])
    try:
        mesh.start()
        address = metrics_address(mesh, "alpha")
        [warning] = events(mesh.log("alpha"), "credential_warning")
        assert "kind=crl_stale" in warning and "CRL is stale: past its nextUpdate by 29.0 days" in warning
        document = mesh.status("alpha")
        assert [w["kind"] for w in document["warnings"]] == ["crl_stale"]
        shown = cli("status", "--socket", mesh.socket("alpha"))
        assert "WARNING: CRL is stale" in shown.stdout
        status, body = get(address, "/metrics")
        assert status == 200
        assert 'quicmesh_credential_warning{kind="crl_stale"} 1.0' in body
        assert re.search(r"^quicmesh_crl_days_left -29\.\d+$", body, re.M)
        # A fresh CRL clears it, by itself, and says so once.
        update_crl(CertificateAuthority.open(mesh_dir / "ca"))
        poll(lambda: events(mesh.log("alpha"), "credential_warning_cleared"), timeout=CUT_WITHIN)
        assert mesh.status("alpha")["warnings"] == []
        assert 'quicmesh_credential_warning{kind="crl_stale"} 0.0' in get(address, "/metrics")[1]
        assert len(events(mesh.log("alpha"), "credential_warning")) == 1
    finally:
        assert mesh.stop() == [0]


def test_readyz_follows_the_min_peers_rule(local_mesh) -> None:
    configure(local_mesh[0].config, min_peers=1)
    mesh = RunningMesh(local_mesh)
    try:
        mesh.start("alpha")
        address = metrics_address(mesh, "alpha")
        assert get(address, "/healthz") == (200, "ok\n")
        assert get(address, "/readyz") == (503, "not ready: 0/2 peers connected, 1 required (min_peers 1)\n")
        mesh.start("beta")
        poll(lambda: get(address, "/readyz")[0] == 200)
        assert get(address, "/readyz")[1] == "ready: 1/2 peers connected, 1 required (min_peers 1)\n"
        configure(local_mesh[0].config, min_peers="100%")
        mesh.signal("alpha", signal.SIGHUP)
        poll(lambda: get(address, "/readyz")[0] == 503)
        assert "1/2 peers connected, 2 required (min_peers 100%)" in get(address, "/readyz")[1]
        mesh.start("gamma")
        poll(lambda: get(address, "/readyz")[0] == 200)
        assert get(address, "/nothing")[0] == 404
    finally:
        mesh.stop(timeout=2.0)


def test_one_log_line_per_peer_event_in_text_and_json(local_mesh) -> None:
    mesh = RunningMesh(local_mesh[:2])
    mesh.start("alpha", args=("--log-format", "json"))
    mesh.start("beta")
    try:
        poll(lambda: connected(mesh, "alpha") == 1)
        poll(lambda: connected(mesh, "beta") == 1)
    finally:
        assert mesh.stop("beta") == [0]
    poll(lambda: '"peer_disconnected"' in mesh.log("alpha"))
    assert mesh.stop("alpha") == [0]
    entries = [json.loads(line) for line in mesh.log("alpha").splitlines()]
    by_event: dict[str, list[dict]] = {}
    for entry in entries:
        by_event.setdefault(entry.get("event", ""), []).append(entry)
    [up] = by_event["peer_connected"]
    assert up["peer"] == "beta" and up["fingerprint"].startswith("sha256:")
    assert up["address"].startswith("127.0.0.1:") and up["rtt_ms"] > 0
    [disconnected] = by_event["peer_disconnected"]
    assert disconnected["peer"] == "beta" and "going away" in disconnected["reason"]
    lifecycle = [e["event"] for e in entries if e.get("event", "").startswith("node_")]
    assert lifecycle == ["node_ready", "node_stopping", "node_stopped"]
    text = [line for line in mesh.log("beta").splitlines() if "event=peer_connected" in line]
    assert len(text) == 1 and " peer=alpha " in text[0] and re.search(r" rtt_ms=[0-9.]+", text[0])


@contextlib.contextmanager
def under_fake_systemd(node: LocalNode, tmp_path: Path, **environment: str) -> Iterator[socket.socket]:
    """`quicmesh run` for ``node`` with NOTIFY_SOCKET on a socket of ours (and ``environment``); yields that
    socket once the node said READY=1, and expects the node to stop cleanly on SIGTERM at the end."""
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify_path))
        systemd.settimeout(10)
        env = quicmesh_env({"NOTIFY_SOCKET": str(notify_path), **environment})
        with open(node.log, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "quicmesh", "run", "-c", str(node.config)],
                                       stdout=log, stderr=log, env=env)
        try:
            assert systemd.recv(4096).startswith(b"READY=1")
            yield systemd
            process.send_signal(signal.SIGTERM)
            assert process.wait(5) == 0
        finally:
            process.kill()


def test_watchdog_pings_reach_the_notify_socket(local_mesh, tmp_path: Path) -> None:
    with under_fake_systemd(local_mesh[0], tmp_path, WATCHDOG_USEC="1000000") as systemd:  # WatchdogSec=1s
        pings = []
        deadline = time.monotonic() + 2.6
        while time.monotonic() < deadline and len(pings) < 20:
            if systemd.recv(4096) == b"WATCHDOG=1":
                pings.append(time.monotonic())
    assert len(pings) >= 4, pings  # one every 0.5 s
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert max(gaps) < 1.0, gaps  # always within WatchdogSec: systemd would not kill it
    assert events(local_mesh[0].log.read_text(), "watchdog")


def test_no_watchdog_pings_for_another_process(local_mesh, tmp_path: Path) -> None:
    with under_fake_systemd(local_mesh[0], tmp_path, WATCHDOG_USEC="200000", WATCHDOG_PID="1") as systemd:
        systemd.settimeout(1.0)  # five pings' worth of silence
        with contextlib.suppress(TimeoutError):
            assert systemd.recv(4096) == b"", "a watchdog ping for another process"
