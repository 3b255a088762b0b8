"""Certificate lifecycle on live nodes (issue 8): a renewed certificate is picked up by reload without
dropping a connection, and a revoked peer is cut off within a second of the reload."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from meshkit import make_mesh
from quicmesh import Node
from quicmesh.config import Config

NAMES = ["alpha", "beta", "gamma"]


def pki(*args: str) -> None:
    tool = Path(sys.executable).with_name("quicmesh-pki")
    done = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def status(node: Node, peer: str):
    return next(p for p in node.peers() if p.name == peer)


async def running(configs: dict[str, Config]) -> dict[str, Node]:
    nodes = {name: Node(config) for name, config in configs.items()}
    for node in nodes.values():
        await node.start()
    for node in nodes.values():
        await node.wait_connected(timeout=10)
    await asyncio.sleep(0.3)  # let simultaneous dials settle: connected_since is compared below
    return nodes


async def test_reload_picks_up_a_renewed_certificate_without_dropping_connections(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", NAMES)
    nodes = await running(configs)
    alpha, beta = nodes["alpha"], nodes["beta"]
    try:
        old = alpha.fingerprint
        since = {name: status(alpha, name).connected_since for name in ("beta", "gamma")}
        seen_by_beta = status(beta, "alpha").connected_since
        pki("sign", "alpha", "--ca-dir", str(tmp_path / "mesh" / "ca"), "--out", str(tmp_path / "mesh" / "alpha"),
            "--ip", "127.0.0.1", "--force")
        await alpha.reload(configs["alpha"])
        assert alpha.fingerprint != old
        await alpha.send("beta", b"after renewal")
        assert (await asyncio.wait_for(beta.recv(), 5)).data == b"after renewal"
        assert {name: status(alpha, name).connected_since for name in ("beta", "gamma")} == since
        assert status(beta, "alpha").connected_since == seen_by_beta
        # A new connection (gamma restarted) sees the renewed certificate.
        await nodes["gamma"].stop()
        nodes["gamma"] = Node(configs["gamma"])
        await nodes["gamma"].start()
        await nodes["gamma"].wait_connected(["alpha"], timeout=10)
        assert status(nodes["gamma"], "alpha").fingerprint == alpha.fingerprint
    finally:
        for node in nodes.values():
            await node.stop()


async def test_a_revoked_peer_is_cut_within_a_second_of_reload(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", NAMES)
    nodes = await running(configs)
    alpha, beta, gamma = nodes["alpha"], nodes["beta"], nodes["gamma"]
    try:
        since = status(alpha, "beta").connected_since
        cut: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        async def watch() -> None:
            async for event in gamma.events():
                if event.kind == "disconnected":
                    cut.setdefault(event.peer, loop.time())
                    if len(cut) == 2:
                        return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        pki("revoke", "gamma", "--ca-dir", str(tmp_path / "mesh" / "ca"))
        reloaded = loop.time()
        await alpha.reload(configs["alpha"])
        await beta.reload(configs["beta"])
        await asyncio.wait_for(watcher, 5)
        delays = {peer: at - reloaded for peer, at in cut.items()}
        print(f"revoked gamma cut off by {', '.join(f'{p} after {d * 1000:.0f} ms' for p, d in sorted(delays.items()))}")
        assert set(delays) == {"alpha", "beta"} and max(delays.values()) < 1.0
        assert status(alpha, "gamma").state != "connected"
        assert status(alpha, "beta").state == "connected" and status(alpha, "beta").connected_since == since
    finally:
        for node in nodes.values():
            await node.stop()
