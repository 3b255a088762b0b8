"""`quicmesh members` and `quicmesh crl push` against running `quicmesh run` daemons; a node made by
`quicmesh-pki join-bundle` joins a running mesh through one seed (issue 16)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningMesh, poll
from pki_helpers import run_pki

from quicmesh.ops.demo import LocalNode, free_udp_ports

CliRun = Callable[..., subprocess.CompletedProcess[str]]


def members_of(cli: CliRun, socket: str) -> dict[str, Any]:
    result = cli("members", "--json", "--socket", socket)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def member(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in document["members"] if m["name"] == name), None)


def test_members_lists_the_peers_from_their_announcements(running_mesh: RunningMesh, cli: CliRun) -> None:
    alpha = running_mesh.socket("alpha")

    def both_alive() -> dict[str, Any] | None:
        document = members_of(cli, alpha)
        found = [member(document, name) for name in ("beta", "gamma")]
        return document if all(m and m["state"] == "alive" and m["connected"] for m in found) else None

    document = poll(both_alive, timeout=10.0)
    assert document["mode"] == "full" and document["open"] is False and document["seeds"] == []
    beta = member(document, "beta")
    assert beta["addresses"] == [f"127.0.0.1:{running_mesh.nodes['beta'].port}"]
    assert beta["version"] > 1_700_000_000_000_000 and abs(time.time() - beta["last_heard"]) < 60
    assert document["counters"]["accepted"] >= 2

    table = cli("members", "--socket", alpha)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("node alpha  members configured  mode full  2 alive, 0 gone")
    assert lines[1].split() == ["NAME", "ADDRESSES", "VERSION", "SOURCE", "LAST-HEARD", "CONNECTED", "STATE"]
    assert lines[2].split()[:2] == ["beta", f"127.0.0.1:{running_mesh.nodes['beta'].port}"]
    assert lines[2].split()[-2:] == ["yes", "alive"] and lines[3].split()[0] == "gamma"


def test_members_of_an_unreachable_node_is_one_line_exit_1(cli: CliRun, tmp_path: Path) -> None:
    for command in (["members"], ["members", "--json"]):
        result = cli(*command, "--socket", str(tmp_path / "none.sock"))
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.splitlines() == [f"quicmesh: error: cannot reach the node at {tmp_path / 'none.sock'}: "
                                              "is `quicmesh run` running?"]


def test_a_pushed_crl_evicts_the_revoked_node_everywhere(running_mesh: RunningMesh, cli: CliRun,
                                                         mesh_dir: Path, tmp_path: Path) -> None:
    revoked = run_pki("revoke", "gamma", "--ca-dir", mesh_dir / "ca")
    assert revoked.returncode == 0, revoked.stderr
    pushed = cli("crl", "push", str(mesh_dir / "ca" / "crl.pem"), "--socket", running_mesh.socket("alpha"))
    assert pushed.returncode == 0, pushed.stderr
    assert "applied" in pushed.stdout and "passes it on" in pushed.stdout

    def gamma_gone_on(name: str) -> bool:
        found = member(members_of(cli, running_mesh.socket(name)), "gamma")
        return found is not None and found["state"] == "gone" and not found["connected"]

    started = time.monotonic()
    poll(lambda: gamma_gone_on("alpha") and gamma_gone_on("beta"), timeout=5.0)
    print(f"gamma evicted from alpha and beta {time.monotonic() - started:.2f} s after the push")
    assert member(members_of(cli, running_mesh.socket("beta")), "gamma")["gone_reason"] == "revoked"
    assert members_of(cli, running_mesh.socket("beta"))["crl_number"] == members_of(
        cli, running_mesh.socket("alpha"))["crl_number"]

    again = cli("crl", "push", str(mesh_dir / "ca" / "crl.pem"), "--json", "--socket", running_mesh.socket("alpha"))
    assert again.returncode == 1 and json.loads(again.stdout)["applied"] is False
    assert again.stderr.startswith("quicmesh: error: the node did not apply the CRL") and "not newer" in again.stderr

    stranger = tmp_path / "stranger-ca"
    assert run_pki("ca", "--mesh", "demo", "--out", stranger).returncode == 0
    foreign = cli("crl", "push", str(stranger / "crl.pem"), "--socket", running_mesh.socket("beta"))
    assert foreign.returncode == 1 and len(foreign.stderr.splitlines()) == 1, foreign.stderr
    assert "did not apply" in foreign.stderr

    not_a_crl = cli("crl", "push", str(mesh_dir / "ca" / "ca.crt"), "--socket", running_mesh.socket("beta"))
    assert not_a_crl.returncode == 1
    assert not_a_crl.stderr.strip().endswith("holds no X509 CRL (found CERTIFICATE)")


@pytest.fixture
def open_mesh(local_mesh: list[LocalNode], mesh_dir: Path) -> RunningMesh:
    """``local_mesh`` with open membership ([mesh] members = "any-certified"), not started."""
    for node in local_mesh:  # a drop-in, as an operator opening an existing mesh would
        (node.config.parent / "conf.d").mkdir()
        (node.config.parent / "conf.d" / "50-mesh.toml").write_text('[mesh]\nmembers = "any-certified"\n')
    return RunningMesh(local_mesh)


def test_a_join_bundle_node_joins_through_one_seed(open_mesh: RunningMesh, mesh_dir: Path, cli: CliRun) -> None:
    alpha = open_mesh.nodes["alpha"]
    (port,) = free_udp_ports(1)
    out = mesh_dir / "delta"
    made = run_pki("join-bundle", "delta", "--ca-dir", mesh_dir / "ca", "--seed", f"127.0.0.1:{alpha.port}",
                   "--listen", f"127.0.0.1:{port}", "--out", out)
    assert made.returncode == 0, made.stderr
    delta = LocalNode("delta", out / "node.toml", out / "quicmesh.sock", port)
    open_mesh.nodes["delta"] = delta
    try:
        open_mesh.start("alpha", "beta", "gamma")
        open_mesh.wait_healthy("alpha", "beta", "gamma")
        open_mesh.start("delta")
        started = time.monotonic()

        def everyone_has_delta() -> bool:
            return all((found := member(members_of(cli, open_mesh.socket(name)), "delta")) is not None
                       and found["connected"] for name in ("alpha", "beta", "gamma"))

        poll(everyone_has_delta, timeout=10.0, interval=0.2)
        print(f"delta connected to all 3 members {time.monotonic() - started:.2f} s after it started")
        joined = members_of(cli, open_mesh.socket("delta"))
        assert joined["open"] and joined["seeds"] == [f"127.0.0.1:{alpha.port}"]
        assert {m["name"] for m in joined["members"] if m["connected"]} == {"alpha", "beta", "gamma"}
    finally:
        open_mesh.stop(timeout=3.0)
