"""NAT traversal (issue 18) through real Linux NAT: `quicmesh run` daemons in network namespaces, a and b each
behind a router namespace of its own doing iptables MASQUERADE, r on the "public" bridge.

- both routers endpoint-independent (port-preserving): a and b punch a direct path through r (the rendezvous);
- one router symmetric (a random port per destination): the punch fails, the relayed path through r carries
  the traffic and stays, without flapping;
- the NAT rebinds (its public address changes, every mapping with it) mid-stream: 0 lost, 0 duplicated;
- dual stack: a node on [::] reaches an IPv4-only and an IPv6-only peer; a name with A and AAAA records whose
  IPv6 address is blackholed connects over IPv4 within the Happy Eyeballs stagger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns.test_relay import (
    MAX_DATAGRAM_SIZE,
    PORT,
    TIMERS,
    Mesh,
    Sender,
    Tally,
    assert_exactly_once,
    start_listening,
    wait_all_received,
)
from netns.topology import EIM, Topology
from pki.bootstrap import NodeSpec, bootstrap
from quicmesh.config import Address, NatSection, load_config, render_config
from quicmesh.ops.control import ControlClient

#: the lab's "public" addresses are private ones (10.231.0.0/24): the nodes must be allowed to dial them
LAB_NAT = NatSection(dial_private=True)


def make_mesh(directory: Path, net: Topology, **listen: str) -> Mesh:
    """One daemon per host (real CA and certs) that knows every other at the address the host has itself (for a
    host behind a NAT its private one, which nobody outside reaches: only a punch can get through) and listens
    there (``listen``: per host, another host to bind instead, e.g. ``"::"``)."""
    bootstrap(directory, "nattest", [NodeSpec(name, net.address(name), PORT) for name in net.hosts])
    for name in net.hosts:
        path = directory / name / "node.toml"
        config = load_config(path)
        config = dataclasses.replace(
            config,
            node=dataclasses.replace(config.node, listen=Address(listen.get(name, net.address(name)), PORT)),
            timers=dataclasses.replace(config.timers, **TIMERS),
            limits=dataclasses.replace(config.limits, max_datagram_size=MAX_DATAGRAM_SIZE),
            nat=LAB_NAT)
        path.write_text(render_config(config))
    return Mesh(net, directory)


@pytest.fixture
def directory() -> Iterator[Path]:
    # Not tmp_path: control socket paths must stay short (Unix sockets take at most ~107 bytes).
    with tempfile.TemporaryDirectory(prefix="qmnat-") as name:
        yield Path(name)


async def send_datagrams(client: ControlClient, peer: str, count: int) -> None:
    for number in range(count):
        await client.send(peer, b"dgram-%06d" % number, datagram=True)
        if number % 50 == 49:
            await asyncio.sleep(0.01)  # paced: a datagram is dropped, never queued, when the path is full


async def wait_datagrams(tally: Tally, count: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        received = {e["data"] for e in tally.other if e.get("kind") == "datagram"}
        if len(received) >= count:
            break
        await asyncio.sleep(0.05)
    received = {e["data"] for e in tally.other if e.get("kind") == "datagram"}
    assert all(re.fullmatch(rb"dgram-\d{6}", d) for d in received)
    return len(received)


# --- 1. both behind endpoint-independent NAT: punched -----------------------------------------------------------
def test_both_behind_eim_nat_punch_a_direct_path(directory: Path) -> None:
    with Topology(["r", "a", "b"], nat={"a": EIM, "b": EIM}) as net:
        mesh = make_mesh(directory, net)
        started = time.monotonic()
        for name in ("r", "a", "b"):
            mesh.start(name)

        async def scenario() -> None:
            direct = await mesh.wait_path("a", "b", "direct", timeout=20)
            await mesh.wait_path("b", "a", "direct", timeout=5)
            print(f"\na <-> b direct {direct - started:.2f}s after the daemons started")
            status_a, status_b = await mesh.status("a"), await mesh.status("b")
            assert status_a["nat"]["counters"]["punches_started"] + status_b["nat"]["counters"]["punches_started"] >= 1
            assert (await mesh.status("r"))["nat"]["counters"]["rendezvous_served"] >= 1
            # r sees a and b at their routers' addresses, with the port they use (port-preserving NAT)
            assert status_a["nat"]["observed"]["r"] == f"{net.public_address('a')}:{PORT}"
            peer_b = next(p for p in status_a["peers"] if p["name"] == "b")
            assert peer_b["remote_address"] == f"{net.public_address('b')}:{PORT}", peer_b

            tally, listening = await start_listening(mesh.socket("b"))
            async with await ControlClient.connect(mesh.socket("a")) as client:
                sender = Sender(client, "b")
                await sender.send(1000, timeout=30)
                await wait_all_received(tally, sender.acknowledged)
                assert_exactly_once(tally, sender.acknowledged, 1000)
                await send_datagrams(client, "b", 1000)
                received = await wait_datagrams(tally, 1000)
                print(f"1000 datagrams a -> b: {received} received")
                assert received >= 950, f"only {received} of 1000 datagrams arrived on a direct LAN-speed path"
            listening.cancel()
            assert await mesh.path("a", "b") == "direct" and await mesh.path("b", "a") == "direct"

        asyncio.run(scenario())
        mesh.check_running()
