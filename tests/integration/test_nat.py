"""The NAT feature's bounds on real nodes on 127.0.0.1 (real aioquic connections and certificates): observed
addresses, bogus reports, punch floods, and offers of addresses outside the dial policy. Punching itself needs
real NATs: tests/netns/test_nat.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from meshkit import make_mesh

from quicmesh import Node, RemoteError
from quicmesh.config import Config, NatSection
from quicmesh.nat.feature import NatFeature
from quicmesh.nat.frame import NatOp, Observe, Offer, Punch, encode_request
from quicmesh.protocol import wire
from quicmesh.runtime.features import FeatureBase

NAT = int(wire.FeatureTag.NAT)


@contextlib.asynccontextmanager
async def running(configs: dict[str, Config], names: tuple[str, ...]) -> AsyncIterator[dict[str, Node]]:
    nodes = {name: Node(configs[name]) for name in names}
    try:
        for node in nodes.values():
            await node.start()
        await asyncio.gather(*(node.wait_connected([n for n in names if n != name], timeout=10)
                               for name, node in nodes.items()))
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop()


def nat_of(node: Node) -> NatFeature:
    feature = node.features.find(NatFeature)
    assert feature is not None
    return feature


async def until(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def mesh(tmp_path: Path, **nat: dict[str, object]) -> dict[str, Config]:
    """alpha, beta, gamma and delta (never started: a peer that is not connected); ``nat``: [nat] keys per node."""
    configs = make_mesh(tmp_path, ["alpha", "beta", "gamma", "delta"])
    return {name: dataclasses.replace(config, nat=NatSection(**nat.get(name, {}))) for name, config in configs.items()}


async def refused(call: Awaitable[bytes], needle: str) -> None:
    with pytest.raises(RemoteError, match=needle):
        await call


async def test_peers_report_where_they_see_a_node(tmp_path: Path) -> None:
    configs = mesh(tmp_path)
    async with running(configs, ("alpha", "beta", "gamma")) as nodes:
        alpha = nat_of(nodes["alpha"])
        await until(lambda: len(alpha.status()["observed"]) == 2, "beta and gamma report alpha's address")
        status = alpha.status()
        listen = f"127.0.0.1:{configs['alpha'].node.listen.port}"
        assert status["observed"] == {"beta": listen, "gamma": listen}
        assert status["public"] == [listen] and status["mapping"] == "endpoint-independent"
        assert nat_of(nodes["beta"]).counters.observe_answered >= 1
        # seen at its own address: no NAT, so no punching, not even to delta (configured, never started)
        assert status["behind_nat"] is False
        await asyncio.sleep(2.0)  # past the second after which a NATed node punches to a peer it has not reached
        assert alpha.counters.punches_started == alpha.counters.punch_attempts_failed == 0
        assert nat_of(nodes["beta"]).counters.rendezvous_served == 0


class Liar(FeatureBase):
    """A peer's NAT feature that answers OBSERVE with ``answer`` (garbage, or no address to see anyone at)."""

    feature_tags = frozenset({NAT})

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def request_received(self, peer: str, tag: int, data: bytes) -> bytes:
        return self.answer


@pytest.mark.parametrize("answer", [b"\x07garbage", bytes([4, 224, 0, 0, 1, 0, 80]), bytes([4, 0, 0, 0, 0, 0, 80])])
async def test_bogus_observed_address_reports_are_counted_and_ignored(tmp_path: Path, answer: bytes) -> None:
    configs = mesh(tmp_path)
    liar = Node(configs["gamma"])
    liar.features.remove(nat_of(liar))
    liar.features.add(Liar(answer))
    await liar.start()
    try:
        async with running(configs, ("alpha", "beta")) as nodes:
            await nodes["alpha"].wait_connected(["gamma"], timeout=10)
            alpha = nat_of(nodes["alpha"])
            await until(lambda: alpha.counters.bogus_reports >= 1 and "beta" in alpha.status()["observed"],
                        "gamma's report counted as bogus, beta's taken")
            assert "gamma" not in alpha.status()["observed"]
            assert alpha.status()["mapping"] == "unknown"  # one real report only
    finally:
        await liar.stop()


async def test_punch_floods_are_rate_limited_and_counted(tmp_path: Path) -> None:
    configs = mesh(tmp_path, beta={"punch_rate": 1.0, "punch_burst": 4})
    async with running(configs, ("alpha", "beta", "gamma")) as nodes:
        alpha, beta = nodes["alpha"], nat_of(nodes["beta"])
        asks = [alpha.features.request("beta", NAT, encode_request(Punch("gamma")), timeout=5) for _ in range(40)]
        results = await asyncio.gather(*asks, return_exceptions=True)
        assert all(isinstance(result, RemoteError) for result in results), results
        too_often = [r for r in results if "too often" in str(r)]
        # a burst of 4 (plus what one second refills while they are answered) went to gamma, which declined:
        # alpha is connected to it directly already
        assert 34 <= len(too_often) <= 36 and beta.counters.refused_rate == len(too_often)
        assert all("declined" in str(r) and "already connected" in str(r) for r in results if r not in too_often)
        assert nodes["beta"].connected_peers() and nodes["gamma"].connected_peers()  # nobody was hurt


@pytest.mark.parametrize("address, dial_private, needle", [
    (("127.0.0.1", 4433), True, "never dialed"),
    (("::1", 4433), True, "never dialed"),
    (("224.0.0.1", 4433), True, "never dialed"),
    (("169.254.1.1", 4433), True, "never dialed"),
    (("10.1.2.3", 4433), False, "dial_private"),
    (("192.168.0.9", 4433), False, "dial_private"),
    (("fd00::9", 4433), False, "dial_private"),
])
async def test_offers_of_addresses_outside_the_dial_policy_are_refused(
        tmp_path: Path, address: tuple[str, int], dial_private: bool, needle: str) -> None:
    configs = mesh(tmp_path, gamma={"dial_private": dial_private})
    async with running(configs, ("alpha", "gamma")) as nodes:
        gamma = nat_of(nodes["gamma"])
        offer = encode_request(Offer("delta", address))  # delta: configured, not connected
        await refused(nodes["alpha"].features.request("gamma", NAT, offer), needle)
        assert gamma.counters.refused_policy == 1 and gamma.counters.offers_accepted == 0
        assert len(nodes["gamma"].connected_peers()) == 1  # no dial went out


async def test_offers_for_strangers_loops_and_malformed_requests_are_refused(tmp_path: Path) -> None:
    configs = mesh(tmp_path, gamma={"dial_private": True})
    async with running(configs, ("alpha", "gamma")) as nodes:
        ask = nodes["alpha"].features.request
        await refused(ask("gamma", NAT, encode_request(Offer("mallory", ("10.0.0.1", 1)))), "not a peer")
        await refused(ask("gamma", NAT, encode_request(Offer("alpha", ("10.0.0.1", 1)))), "not a peer")
        await refused(ask("gamma", NAT, encode_request(Punch("gamma"))), "loop")
        await refused(ask("gamma", NAT, encode_request(Punch("delta"))), "no direct connection to delta")
        await refused(ask("gamma", NAT, bytes([NatOp.OFFER, 4, 1])), "truncated")
        assert nat_of(nodes["gamma"]).counters.refused_other == 4
        assert await ask("gamma", NAT, encode_request(Observe()))  # still serving


async def test_punching_and_rendezvous_can_be_turned_off(tmp_path: Path) -> None:
    configs = mesh(tmp_path, gamma={"punch": False, "rendezvous": False})
    async with running(configs, ("alpha", "gamma")) as nodes:
        ask = nodes["alpha"].features.request
        await refused(ask("gamma", NAT, encode_request(Observe())), "rendezvous = false")
        await refused(ask("gamma", NAT, encode_request(Punch("delta"))), "rendezvous = false")
        await refused(ask("gamma", NAT, encode_request(Offer("delta", ("10.0.0.1", 1)))), "punch = false")
        assert nat_of(nodes["alpha"]).status()["observed"] == {}
