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
import itertools
import re
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
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
from netns.topology import EIM, SYMMETRIC, Topology
from pki.bootstrap import NodeSpec, bootstrap
from quicmesh.config import Address, NatSection, load_config, render_config
from quicmesh.ops.control import ControlClient
from quicmesh.runtime.dialing import STAGGER

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


def started(mesh: Mesh) -> Mesh:
    """Every host's daemon started."""
    for name in mesh.net.hosts:
        mesh.start(name)
    return mesh


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
        mesh = started(make_mesh(directory, net))

        async def scenario() -> None:
            await mesh.wait_path("a", "b", "direct", timeout=20)
            await mesh.wait_path("b", "a", "direct", timeout=5)
            took = seconds_after_start(mesh.log("a"), "peer=b ", "path=direct")
            assert took is not None and took < 5.0, took  # a punch is tried 1 s after start and takes a round trip
            print(f"\na -> b direct {took:.2f}s after a started")
            status_a, status_b = await mesh.status("a"), await mesh.status("b")
            assert status_a["nat"]["counters"]["punches_started"] + status_b["nat"]["counters"]["punches_started"] >= 1
            assert (await mesh.status("r"))["nat"]["counters"]["rendezvous_served"] >= 1
            # r sees a and b at their routers' addresses, with the port they use (port-preserving NAT)
            assert status_a["nat"]["observed"]["r"] == f"{net.public_address('a')}:{PORT}"
            assert status_a["nat"]["behind_nat"] and not (await mesh.status("r"))["nat"]["behind_nat"]
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


# --- 2. one side symmetric: relayed, and it stays -------------------------------------------------------------
def test_symmetric_nat_stays_relayed_without_flapping(directory: Path) -> None:
    with Topology(["r", "a", "b"], nat={"a": EIM, "b": SYMMETRIC}) as net:
        mesh = started(make_mesh(directory, net))

        async def scenario() -> None:
            await mesh.wait_path("a", "b", "via r", timeout=20)
            await mesh.wait_path("b", "a", "via r", timeout=5)
            tally, listening = await start_listening(mesh.socket("b"))
            async with await ControlClient.connect(mesh.socket("a")) as client:
                sender = Sender(client, "b")
                watched = 0
                until = time.monotonic() + 8.0  # a few punch attempts (they back off from 1 s)
                while time.monotonic() < until:
                    await sender.send(20, timeout=10)
                    paths = (await mesh.path("a", "b"), await mesh.path("b", "a"))
                    assert paths == ("via r", "via r"), f"the relayed path flapped: {paths} after {watched} looks"
                    watched += 1
                await wait_all_received(tally, sender.acknowledged)
                assert_exactly_once(tally, sender.acknowledged, sender.sent)
            listening.cancel()
            status_a, status_b = await mesh.status("a"), await mesh.status("b")
            tried = status_a["nat"]["counters"]["punches_started"] + status_b["nat"]["counters"]["punches_started"]
            print(f"{tried} punches tried in 8 s, {watched} looks at the path, relayed throughout")
            assert tried >= 2, (status_a["nat"], status_b["nat"])
            # b's NAT gives each destination its own port: r sees b at a port other than the one b listens on
            assert status_b["nat"]["observed"]["r"] != f"{net.public_address('b')}:{PORT}"
            for status in (status_a, status_b):  # one connection to each peer all along: nothing replaced
                connected = {p["name"]: p["connected_since"] for p in status["peers"]}
                assert all(since is not None for since in connected.values()), connected

        asyncio.run(scenario())
        assert mesh.log("a").count("peer_connection_replaced") == 0, "a's path to b changed"
        mesh.check_running()


# --- 3. NAT rebinding mid-stream ------------------------------------------------------------------------------
def rebinding_run(net: Topology, mesh: Mesh, sender_host: str, receiver: str, rebound: str) -> float:
    """Stream messages ``sender_host`` -> ``receiver`` and rebind ``rebound``'s NAT mid-stream; every message
    arrives exactly once; returns the longest pause between arrivals (seconds)."""

    async def scenario() -> float:
        tally, listening = await start_listening(mesh.socket(receiver))
        async with await ControlClient.connect(mesh.socket(sender_host)) as client:
            sender = Sender(client, receiver)
            await sender.send(500, timeout=20)
            streaming = asyncio.create_task(sender.send(2000, timeout=30))
            await asyncio.sleep(0.2)
            rebound_at = time.monotonic()
            new = net.rebind(rebound)
            await streaming
            await sender.send(200, timeout=10)
            await wait_all_received(tally, sender.acknowledged)
            assert_exactly_once(tally, sender.acknowledged, 2700)
        listening.cancel()
        times = [t for t, _ in sorted(tally.arrivals) if t >= rebound_at - 0.5]
        gap = max(b - a for a, b in itertools.pairwise(times))
        seen = next(p for p in (await mesh.status(receiver if receiver != rebound else sender_host))["peers"]
                    if p["name"] == rebound)
        print(f"{rebound}'s NAT moved to {new}: longest pause {gap:.2f}s; now seen at {seen['remote_address']}")
        assert seen["remote_address"].startswith(new), seen
        return gap

    return asyncio.run(scenario())


def test_rebinding_of_a_node_that_dialed_out_keeps_its_connection(directory: Path) -> None:
    """a (behind NAT) dialed r: r's side of the connection follows a's new address (QUIC migration)."""
    with Topology(["r", "a"], nat={"a": EIM}) as net:
        mesh = started(make_mesh(directory, net))
        asyncio.run(mesh.wait_path("a", "r", "direct", timeout=20))
        gap = rebinding_run(net, mesh, "a", "r", "a")
        assert gap < 1.0
        assert "peer_disconnected" not in mesh.log("r") + mesh.log("a"), "the connection did not survive"


def test_rebinding_of_a_punched_pair_recovers_within_5s(directory: Path) -> None:
    """a and b punched a direct path; a's NAT moves. If a had dialed the kept connection, b's side follows it; if
    b had, b (the QUIC client) must drop packets from a new server address (RFC 9000 section 9), the connection
    dies after timers.dead_after and the pair punches again: within 5 s either way."""
    with Topology(["r", "a", "b"], nat={"a": EIM, "b": EIM}) as net:
        mesh = started(make_mesh(directory, net))
        asyncio.run(mesh.wait_path("a", "b", "direct", timeout=20))
        gap = rebinding_run(net, mesh, "a", "b", "a")
        assert gap < 5.0
        asyncio.run(mesh.wait_path("a", "b", "direct", timeout=10))


# --- 4. dual stack and several addresses ------------------------------------------------------------------------
def dual_stack_mesh(directory: Path, net: Topology, addresses: dict[str, dict[str, str]], listen: dict[str, str]
                    ) -> Mesh:
    """Like make_mesh, then each node's peers at ``addresses[node][peer]`` (a host or name; port PORT)."""
    mesh = make_mesh(directory, net, **listen)
    for name, peers in addresses.items():
        path = mesh.config(name)
        config = load_config(path)
        config = dataclasses.replace(config, peers=tuple(
            dataclasses.replace(peer, address=Address(peers[peer.name], PORT)) for peer in config.peers))
        path.write_text(render_config(config))
    return mesh


def test_a_node_on_the_ipv6_wildcard_dials_ipv4_only_and_ipv6_only_peers(directory: Path) -> None:
    with Topology(["d", "v4", "v6"], ipv6=True) as net:
        net.remove_family("v4", 6)
        net.remove_family("v6", 4)
        v4, v6 = net.address("v4"), net.hosts["v6"].address6
        assert v6 is not None
        # v4 and v6 know d at a port nobody listens on: only d's dials can connect the pairs
        mesh = dual_stack_mesh(directory, net, {"d": {"v4": v4, "v6": v6}, "v4": {"d": "10.231.0.1", "v6": v6},
                                                "v6": {"d": "fd00:231::1", "v4": v4}},
                               listen={"d": "::", "v6": v6})
        for name in ("v4", "v6"):
            path = mesh.config(name)
            config = load_config(path)
            path.write_text(render_config(dataclasses.replace(config, peers=tuple(
                dataclasses.replace(p, address=Address(p.address.host, 9)) if p.name == "d" else p
                for p in config.peers))))
        started(mesh)

        async def scenario() -> None:
            await mesh.wait_path("d", "v4", "direct", timeout=20)
            await mesh.wait_path("d", "v6", "direct", timeout=20)
            peers = {p["name"]: p["remote_address"] for p in (await mesh.status("d"))["peers"]}
            print(f"\nd on [::] reaches {peers}")
            assert peers["v4"] in (f"{v4}:{PORT}", f"[::ffff:{v4}]:{PORT}") and peers["v6"] == f"[{v6}]:{PORT}"

        asyncio.run(scenario())


def seconds_after_start(log: str, *needles: str) -> float | None:
    """Seconds from the node's endpoint starting to its first log line holding every needle (log timestamps:
    the interpreter's start-up is not counted); None if there is none."""
    lines = log.splitlines()
    started = next((line for line in lines if "event=endpoint_started" in line), None)
    found = next((line for line in lines if all(needle in line for needle in needles)), None)
    if started is None or found is None:
        return None
    return datetime.fromisoformat(found.split()[0]).timestamp() - datetime.fromisoformat(started.split()[0]).timestamp()


@pytest.mark.parametrize("blackholed", [6, 4])
def test_a_name_with_a_and_aaaa_connects_past_a_blackholed_family(directory: Path, blackholed: int) -> None:
    with Topology(["d", "t"], ipv6=True) as net:
        t4, t6 = net.address("t"), net.hosts["t"].address6
        assert t6 is not None
        net.hosts_file("d", {"t.test": [t6, t4]})
        net.blackhole("t", blackholed)
        mesh = dual_stack_mesh(directory, net, {"d": {"t": "t.test"}, "t": {"d": "10.231.0.1"}},
                               listen={"d": "::", "t": "::"})
        path = mesh.config("t")  # t knows d at a dead port: only d's dial connects them
        config = load_config(path)
        path.write_text(render_config(dataclasses.replace(
            config, peers=tuple(dataclasses.replace(p, address=Address(p.address.host, 9)) for p in config.peers))))
        started(mesh)
        asyncio.run(mesh.wait_path("d", "t", "direct", timeout=20))
        took = seconds_after_start(mesh.log("d"), "event=peer_connected", "peer=t ")
        assert took is not None
        remote = next(p for p in asyncio.run(mesh.status("d"))["peers"] if p["name"] == "t")["remote_address"]
        print(f"\nIPv{blackholed} blackholed: d reached t.test at {remote} {took * 1000:.0f} ms after it started")
        assert (t4 in remote) if blackholed == 6 else (t6 in remote), remote
        # the first attempt goes to IPv6; past a blackholed IPv6 the IPv4 one starts one stagger later
        assert took < STAGGER + 1.0, f"{took:.2f}s: not within the stagger (+1 s for the handshake on a busy host)"
