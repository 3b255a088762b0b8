"""Relaying across real nodes on 127.0.0.1 (quicmesh/relay): real aioquic connections, real certificates, an
end-to-end QUIC + mutual-TLS connection carried inside the relay's DATAGRAM frames. A pair is "broken" by giving
each node a closed port as the other's address: their direct dials fail, everything else is real."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from meshkit import make_mesh, with_limits, with_timers
from udpproxy import UdpRelay
from quicmesh import DatagramTooLargeError, Node, RemoteError
from quicmesh.config import Address, Config
from quicmesh.ops.metrics import render
from quicmesh.ops.status import build_status
from quicmesh.protocol import wire
from quicmesh.protocol.wire.relay import Connect, encode_relay_message
from quicmesh.relay.feature import RelayFeature

CLOSED_PORT = Address("127.0.0.1", 9)  # nothing answers QUIC there: a direct dial times out
WAIT = 30.0  # no single wait of a test may take longer


def relay_mesh(directory: Path, names: list[str], *, broken: tuple[tuple[str, str], ...] = (),
               relay: dict[str, dict[str, object]] | None = None,
               datagram_size: dict[str, int] | None = None, handshake_timeout: float = 1.0) -> dict[str, Config]:
    """A mesh with fast timers and 1452-byte datagrams (what relaying needs) unless ``datagram_size`` says
    otherwise; each ``broken`` pair gets the closed port for each other; ``relay``: [relay] keys per node."""
    configs = make_mesh(directory, names)
    for name, config in configs.items():
        config = with_limits(with_timers(config, handshake_timeout=handshake_timeout),
                             max_datagram_size=(datagram_size or {}).get(name, 1452))
        cut = {b for a, b in broken if a == name} | {a for a, b in broken if b == name}
        peers = tuple(dataclasses.replace(p, address=CLOSED_PORT) if p.name in cut else p for p in config.peers)
        section = dataclasses.replace(config.relay, **(relay or {}).get(name, {}))
        configs[name] = dataclasses.replace(config, peers=peers, relay=section)
    return configs


@contextlib.asynccontextmanager
async def running(configs: dict[str, Config]) -> AsyncIterator[dict[str, Node]]:
    nodes = {name: Node(config) for name, config in configs.items()}
    try:
        for node in nodes.values():
            await node.start()
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop()


def relay_of(node: Node) -> RelayFeature:
    feature = node.features.find(RelayFeature)
    assert feature is not None
    return feature


def path(node: Node, peer: str) -> str | None:
    return next(status.path for status in node.peers() if status.name == peer)


async def until(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        await asyncio.sleep(0.05)


async def relayed(a: Node, c: Node, via: str | None = None) -> str:
    """Wait until ``a`` and ``c`` are connected through a relay (``via``, or any): the relay's name."""
    def both() -> bool:
        ours, theirs = path(a, c.name), path(c, a.name)
        return ours is not None and ours.startswith("via ") and ours == theirs and (via is None or ours == f"via {via}")

    await until(both, f"{a.name} and {c.name} connected via {via or 'a relay'}")
    return str(path(a, c.name))[4:]


async def receive(node: Node, count: int, timeout: float = WAIT) -> list[bytes]:
    async with asyncio.timeout(timeout):
        return [(await node.recv()).data for _ in range(count)]


def tap(relay: Node, change: Callable[[bytes], bytes] | None = None) -> list[bytes]:
    """Record every RELAY_DOWN datagram ``relay`` forwards (what it could read), optionally altering it."""
    host, seen = relay.features, []
    forward = host.send_datagram

    def send_datagram(peer: str, datagram: bytes, payload_size: int) -> str | None:
        if datagram[0] == wire.DatagramKind.RELAY_DOWN:
            seen.append(datagram)
            datagram = change(datagram) if change is not None else datagram
        return forward(peer, datagram, payload_size)

    host.send_datagram = send_datagram  # type: ignore[method-assign]
    return seen


# --- a relayed connection carries everything ------------------------------------------------------------
async def test_a_broken_pair_connects_through_the_relay_and_everything_crosses(tmp_path: Path) -> None:
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),))
    async with running(configs) as nodes:
        alpha, beta, gamma = nodes["alpha"], nodes["beta"], nodes["gamma"]
        await relayed(alpha, gamma, via="beta")
        assert path(alpha, "beta") == "direct" == path(gamma, "beta")
        seen = tap(beta)
        secret = b"plaintext-the-relay-must-never-see"
        for i in range(300):
            await alpha.send("gamma", secret + b"%d" % i)
        assert await receive(gamma, 300) == [secret + b"%d" % i for i in range(300)]  # all, in order, once
        await gamma.send("alpha", b"back")
        assert await receive(alpha, 1) == [b"back"]
        gamma.set_request_handler(lambda peer, data: peer.encode() + b":" + data)
        alpha.set_request_handler(lambda peer, data: peer.encode() + b":" + data)
        assert await alpha.request("gamma", b"q") == b"alpha:q"
        assert await gamma.request("alpha", b"r") == b"gamma:r"
        got: list[bytes] = []
        for _ in range(20):  # datagrams stay unreliable: a few tries, bounded
            alpha.send_datagram("gamma", secret)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    got.append((await gamma.recv()).data)
                    break
        assert got == [secret]
        with pytest.raises(DatagramTooLargeError):  # a relayed connection's packets are 1,200 bytes
            alpha.send_datagram("gamma", b"x" * 1200)
        alpha.send_datagram("beta", b"x" * 1300)  # the outer one takes more
        assert seen and not any(secret in datagram for datagram in seen)  # the relay saw ciphertext only
        status = relay_of(beta).status()
        assert status["circuits_open"] == 1 and {status["circuits"][0]["a"], status["circuits"][0]["c"]} == {
            "alpha", "gamma"}
        assert status["circuits"][0]["bytes"] > 300 * len(secret)
        document = build_status(alpha, started=time.time())
        assert {peer["name"]: peer["path"] for peer in document["peers"]} == {"beta": "direct", "gamma": "via beta"}
        assert document["relay"]["paths"] or relay_of(gamma).status()["paths"]  # the end that was offered it


async def test_a_relay_that_alters_packets_delivers_nothing(tmp_path: Path) -> None:
    """Bits flipped by the relay: the inner QUIC connection drops every packet (AEAD), so it dies instead of
    delivering garbage; once the relay stops tampering, the message comes through exactly once."""
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),))
    async with running(configs) as nodes:
        alpha, beta, gamma = nodes["alpha"], nodes["beta"], nodes["gamma"]
        await relayed(alpha, gamma, via="beta")
        tampering = True

        def flip(datagram: bytes) -> bytes:
            return datagram[:-1] + bytes((datagram[-1] ^ 0x01,)) if tampering else datagram

        tap(beta, flip)
        sending = asyncio.ensure_future(alpha.send("gamma", b"intact"))
        await until(lambda: path(alpha, "gamma") is None, "the tampered connection died")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await gamma.recv()
        tampering = False
        await relayed(alpha, gamma)
        assert await receive(gamma, 1) == [b"intact"]
        await asyncio.wait_for(sending, WAIT)
        with pytest.raises(TimeoutError):  # and only once
            async with asyncio.timeout(0.5):
                await gamma.recv()


# --- refusals, with the reason visible at the asking node -----------------------------------------------
REFUSALS = {
    "serve off": ({"beta": {"serve": False}}, {}, "beta does not relay ([relay] serve = false)"),
    "not allowed": ({"beta": {"allow": ("gamma",)}, "gamma": {"use": False}}, {},
                    "beta does not relay for alpha (not in [relay] allow)"),
    "no circuits": ({"beta": {"max_circuits": 0}}, {}, "beta is at its max_circuits (0)"),
    "far end unwilling": ({"gamma": {"use": False}}, {},
                          "gamma takes no relayed connections ([relay] use = false)"),
    "asker's datagrams too small": ({}, {"alpha": 1200}, "raise limits.max_datagram_size to 1452"),
    "far end's datagrams too small": ({}, {"gamma": 1200},
                                      "the connection beta-gamma carries datagrams of at most"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusals_are_explained_at_the_asking_node(tmp_path: Path, case: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    relay, sizes, reason = REFUSALS[case]
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),), relay=relay,
                         datagram_size=sizes)
    caplog.set_level(logging.INFO, logger="quicmesh.relay")
    async with running(configs) as nodes:
        alpha, beta = nodes["alpha"], nodes["beta"]
        await until(lambda: reason in str(relay_of(alpha).status()["errors"].get("gamma")), f"alpha told: {reason}")
        errors = relay_of(alpha).status()["errors"]
        assert path(alpha, "gamma") is None and path(nodes["gamma"], "alpha") is None
        assert relay_of(beta).status()["circuits_open"] == 0
        logged = [r.getMessage() for r in caplog.records if r.name == "quicmesh.relay"]
        assert any(message.startswith("cannot reach gamma through a relay: ") and reason in message
                   for message in logged), logged
        assert reason in errors["gamma"]


async def test_circuits_are_never_chained_and_loops_are_refused(tmp_path: Path) -> None:
    """beta reaches gamma only through delta: alpha, which reaches only beta directly, gets no circuit to gamma
    (one relay hop at most), and a hand-made Connect to beta for gamma, alpha or beta itself is refused."""
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma", "delta"],
                         broken=(("alpha", "gamma"), ("beta", "gamma"), ("alpha", "delta")))
    async with running(configs) as nodes:
        alpha, beta = nodes["alpha"], nodes["beta"]
        await relayed(beta, nodes["gamma"], via="delta")
        await relayed(alpha, nodes["delta"], via="beta")
        await until(lambda: "none of beta reaches gamma directly" in str(relay_of(alpha).status()["errors"].get(
            "gamma")), "alpha told no relay reaches gamma directly")
        assert path(alpha, "gamma") is None
        for target, reason in (("gamma", "beta has no direct connection to gamma (circuits are never chained)"),
                               ("zeta", "beta has no direct connection to zeta"),
                               ("alpha", "a circuit from alpha to alpha through beta would be a loop"),
                               ("beta", "a circuit from alpha to beta through beta would be a loop")):
            with pytest.raises(RemoteError, match=re.escape(reason)):
                await alpha.features.request("beta", wire.FeatureTag.RELAY, encode_relay_message(Connect(target)))
        assert [{c["a"], c["c"]} for c in relay_of(beta).status()["circuits"]] == [{"alpha", "delta"}]


# --- failover, teardown, return to direct, budgets ------------------------------------------------------
async def test_when_the_relay_stops_the_pair_moves_to_another_relay(tmp_path: Path) -> None:
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma", "delta"], broken=(("alpha", "gamma"),))
    async with running(configs) as nodes:
        alpha, gamma = nodes["alpha"], nodes["gamma"]
        first = await relayed(alpha, gamma)
        for i in range(50):
            await alpha.send("gamma", b"%d" % i)
        stopped = time.monotonic()
        await nodes[first].stop()
        await until(lambda: path(alpha, "gamma") != f"via {first}", f"the connection through {first} ended")
        sending = asyncio.ensure_future(asyncio.gather(*(alpha.send("gamma", b"%d" % i) for i in range(50, 100))))
        second = await relayed(alpha, gamma)
        switch = time.monotonic() - stopped
        assert second != first and second in ("beta", "delta")
        received = await receive(gamma, 100)
        await asyncio.wait_for(sending, WAIT)
        assert sorted(received, key=int) == [b"%d" % i for i in range(100)]  # none lost, none twice
        print(f"relay {first} stopped: via {second} after {switch:.2f}s")


async def test_the_relay_closes_the_circuit_when_an_end_goes(tmp_path: Path) -> None:
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),))
    async with running(configs) as nodes:
        alpha, beta = nodes["alpha"], nodes["beta"]
        await relayed(alpha, nodes["gamma"], via="beta")
        assert relay_of(beta).status()["circuits_open"] == 1
        await nodes["gamma"].stop()
        await until(lambda: relay_of(beta).status()["circuits_open"] == 0, "beta dropped the circuit")
        await until(lambda: not relay_of(alpha).status()["paths"], "alpha forgot its end of the circuit")
        assert path(alpha, "gamma") is None


async def test_a_healed_direct_path_replaces_the_relayed_one(tmp_path: Path) -> None:
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),))
    async with running(configs) as nodes:
        alpha, gamma = nodes["alpha"], nodes["gamma"]
        await relayed(alpha, gamma, via="beta")
        sending = asyncio.ensure_future(asyncio.gather(*(alpha.send("gamma", b"%d" % i) for i in range(200))))
        for name, other in (("alpha", "gamma"), ("gamma", "alpha")):  # the path heals: the real address
            address = Address("127.0.0.1", nodes[other].listen_address[1])
            peers = tuple(dataclasses.replace(p, address=address) if p.name == other else p
                          for p in configs[name].peers)
            await nodes[name].reload(dataclasses.replace(configs[name], peers=peers))
        await until(lambda: path(alpha, "gamma") == "direct" == path(gamma, "alpha"), "back to direct")
        assert sorted(await receive(gamma, 200), key=int) == [b"%d" % i for i in range(200)]
        await asyncio.wait_for(sending, WAIT)
        await until(lambda: relay_of(nodes["beta"]).status()["circuits_open"] == 0, "the circuit released")


async def test_the_byte_budget_drops_and_counts(tmp_path: Path) -> None:
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),),
                         relay={"beta": {"max_bytes_per_second": 40_000.0}})
    async with running(configs) as nodes:
        alpha, beta, gamma = nodes["alpha"], nodes["beta"], nodes["gamma"]
        await relayed(alpha, gamma, via="beta")
        for _ in range(200):  # 200 kB at once: far over 40 kB/s
            alpha.send_datagram("gamma", b"d" * 1000)
        await until(lambda: relay_of(beta).status()["counters"]["dropped_over_budget"] > 0, "drops counted")
        got = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while True:
                    await gamma.recv()
                    got += 1
        assert 0 < got < 200
        await asyncio.sleep(1.0)  # the budget refills: reliable messages still cross
        await alpha.send("gamma", b"after")
        async with asyncio.timeout(WAIT):  # datagrams still queued may come first (a busy machine is slow)
            late = 0
            while (item := await gamma.recv()).data != b"after":
                assert item.data == b"d" * 1000 and late < 200
                late += 1


async def test_a_direct_path_cut_mid_stream_fails_over_within_5_s_and_back(tmp_path: Path) -> None:
    """alpha reaches gamma through a UDP proxy (gamma cannot dial alpha at all); the proxy cuts the path
    mid-stream, then heals it. Issue 14: traffic moves to a relay within 5 s of the dead-peer detection
    (dead_after) and back to direct when the path heals, no message lost or duplicated across both switches.
    The default handshake_timeout (5 s) is kept: a direct redial of a cut path takes that long to fail."""
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], handshake_timeout=5.0)
    proxy = UdpRelay(("127.0.0.1", configs["gamma"].node.listen.port))
    port = await proxy.start()
    configs["alpha"] = dataclasses.replace(configs["alpha"], peers=tuple(
        dataclasses.replace(p, address=Address("127.0.0.1", port)) if p.name == "gamma" else p
        for p in configs["alpha"].peers))
    configs["gamma"] = dataclasses.replace(configs["gamma"], peers=tuple(
        dataclasses.replace(p, address=CLOSED_PORT) if p.name == "alpha" else p for p in configs["gamma"].peers))
    dead_after = configs["alpha"].timers.dead_after
    try:
        async with running(configs) as nodes:
            alpha, gamma = nodes["alpha"], nodes["gamma"]
            await until(lambda: path(alpha, "gamma") == "direct" == path(gamma, "alpha"), "direct through the proxy")
            count, sent = 600, 0

            async def send_all() -> None:
                nonlocal sent
                for i in range(count):
                    await alpha.send("gamma", b"%d" % i)
                    sent += 1
                    await asyncio.sleep(0.01)

            sending = asyncio.ensure_future(send_all())
            await until(lambda: sent >= 50, "traffic flowing")
            proxy.cut, cut_at = True, time.monotonic()
            await relayed(alpha, gamma, via="beta")
            to_relay = time.monotonic() - cut_at
            proxy.cut, healed_at = False, time.monotonic()
            await until(lambda: path(alpha, "gamma") == "direct" == path(gamma, "alpha"), "back to direct")
            to_direct = time.monotonic() - healed_at
            received = await receive(gamma, count, timeout=60)
            await asyncio.wait_for(sending, WAIT)
            lost = count - len(set(received))
            duplicated = len(received) - len(set(received))
            print(f"cut -> relayed {to_relay:.2f}s, healed -> direct {to_direct:.2f}s, "
                  f"lost {lost}, duplicated {duplicated}")
            assert (lost, duplicated) == (0, 0)
            assert sorted(received, key=int) == [b"%d" % i for i in range(count)]
            assert to_relay <= dead_after + 5.0, f"relayed {to_relay:.2f}s after the cut"
    finally:
        proxy.close()


async def test_a_close_for_one_role_leaves_the_other_roles_circuit_alone(tmp_path: Path) -> None:
    """alpha reaches gamma through beta while beta reaches delta through alpha: each is a relay and an end, and
    every relay numbers its circuits from 1. When alpha's circuit through beta closes (the direct path heals),
    beta must drop that circuit only, not its own circuit through alpha that happens to have the same id."""
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma", "delta"],
                         broken=(("alpha", "gamma"), ("beta", "delta")),
                         relay={"gamma": {"serve": False}, "delta": {"serve": False}})
    async with running(configs) as nodes:
        alpha, beta, gamma, delta = (nodes[name] for name in ("alpha", "beta", "gamma", "delta"))
        await relayed(alpha, gamma, via="beta")
        await relayed(beta, delta, via="alpha")
        await asyncio.sleep(1.5)  # duplicates from both ends' attempts settled
        through_beta = {c["id"] for c in relay_of(beta).status()["circuits"]}
        through_alpha = {c["id"] for c in relay_of(alpha).status()["circuits"]}
        print(f"circuit ids through beta {through_beta}, through alpha {through_alpha}")
        for name, other in (("alpha", "gamma"), ("gamma", "alpha")):  # heal alpha <-> gamma
            address = Address("127.0.0.1", nodes[other].listen_address[1])
            peers = tuple(dataclasses.replace(p, address=address) if p.name == other else p
                          for p in configs[name].peers)
            await nodes[name].reload(dataclasses.replace(configs[name], peers=peers))
        await until(lambda: path(alpha, "gamma") == "direct", "alpha <-> gamma direct again")
        paths = set()
        for _ in range(40):  # 2 s, longer than dead_after: beta <-> delta must stay up throughout
            paths.add(path(beta, "delta"))
            await asyncio.sleep(0.05)
        assert paths == {"via alpha"}


async def test_metrics_show_the_relayed_path_and_the_relays_work(tmp_path: Path) -> None:
    configs = relay_mesh(tmp_path, ["alpha", "beta", "gamma"], broken=(("alpha", "gamma"),))
    async with running(configs) as nodes:
        await relayed(nodes["alpha"], nodes["gamma"], via="beta")
        await nodes["alpha"].send("gamma", b"counted")
        at_alpha, at_beta = render(nodes["alpha"]), render(nodes["beta"])
        assert 'quicmesh_peer_relayed{peer="gamma",relay="beta"} 1.0' in at_alpha
        assert 'peer="beta"' not in at_alpha.split("quicmesh_peer_relayed")[1].split("# HELP")[0]  # direct
        assert "quicmesh_relay_circuits 1.0" in at_beta
        assert 'quicmesh_relay_circuits_total{outcome="opened"} 1.0' in at_beta
        relayed_bytes = re.search(r"^quicmesh_relay_bytes_total (\S+)$", at_beta, re.M)
        assert relayed_bytes is not None and float(relayed_bytes.group(1)) > 0
