"""Subjects across real nodes on 127.0.0.1: real aioquic connections and certificates, a real process killed
with SIGKILL. Publishers on alpha and beta, subscribers on gamma, delta and epsilon."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from meshkit import make_mesh
from quicmesh import (
    DatagramTooLargeError,
    InvalidSubjectError,
    NoRespondersError,
    Node,
    PublishError,
    RequestTimeoutError,
)
from quicmesh.config import Config
from quicmesh.config.model import PubSubPeer, PubSubSection
from quicmesh.protocol import wire
from quicmesh.pubsub.feature import PubSub
from quicmesh.pubsub.subscription import Msg, Subscription

NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]
MEMBER = Path(__file__).parents[1] / "pubsub_member.py"


async def start(configs: dict[str, Config], names: list[str] | None = None) -> dict[str, Node]:
    nodes = {name: Node(configs[name]) for name in names or configs}
    for node in nodes.values():
        await node.start()
    for node in nodes.values():
        await node.wait_connected([n for n in nodes if n != node.name], timeout=15)
    return nodes


@pytest.fixture
async def mesh5(tmp_path: Path):
    nodes = await start(make_mesh(tmp_path / "mesh", NAMES))
    try:
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop()


def pubsub(node: Node) -> PubSub:
    feature = node.features.find(PubSub)
    assert feature is not None
    return feature


async def until(check, timeout: float = 5.0, what: str = "condition") -> None:  # noqa: ANN001
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def interest_known(nodes: dict[str, Node], watcher: str, peer: str, count: int) -> None:
    """Until ``watcher`` knows ``count`` interest entries of ``peer``."""
    feature = pubsub(nodes[watcher])
    await until(lambda: len(feature._remote.entries(peer)) == count, what=f"{watcher} knows {peer}'s interest")


async def drain(subscription: Subscription, count: int, timeout: float = 10.0) -> list[Msg]:
    got = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            got.append(await subscription.next())
    return got


async def test_reliable_publish_reaches_every_matching_subscriber_exactly_once(mesh5: dict[str, Node]) -> None:
    gamma = mesh5["gamma"].subscribe("orders.>")
    delta = mesh5["delta"].subscribe("orders.*.created")
    epsilon = mesh5["epsilon"].subscribe("metrics.*")
    for publisher in ("alpha", "beta"):
        for peer, count in (("gamma", 1), ("delta", 1), ("epsilon", 1)):
            await interest_known(mesh5, publisher, peer, count)
    sent: Counter[str] = Counter()
    for i in range(100):
        for publisher in ("alpha", "beta"):
            subject = ["orders.eu.created", "orders.eu.paid", "metrics.cpu", "other.thing"][i % 4]
            reached = await mesh5[publisher].publish(subject, f"{publisher} {i}".encode(), reliable=True)
            assert reached == {"orders.eu.created": 2, "orders.eu.paid": 1, "metrics.cpu": 1, "other.thing": 0}[subject]
            sent[subject] += 1
    got_gamma = await drain(gamma, sent["orders.eu.created"] + sent["orders.eu.paid"])
    got_delta = await drain(delta, sent["orders.eu.created"])
    got_epsilon = await drain(epsilon, sent["metrics.cpu"])
    await asyncio.sleep(0.3)  # anything extra would have arrived by now
    assert gamma.pending == delta.pending == epsilon.pending == 0
    for got in (got_gamma, got_delta, got_epsilon):
        assert len({m.data for m in got}) == len(got)  # no duplicate
    assert {m.subject for m in got_delta} == {"orders.eu.created"}
    assert {m.peer for m in got_gamma} == {"alpha", "beta"}
    # nodes with no matching subscriber were not sent anything
    for name in ("alpha", "beta"):
        assert pubsub(mesh5[name]).counters.received == 0
    assert pubsub(mesh5["epsilon"]).counters.received == sent["metrics.cpu"]
    assert pubsub(mesh5["delta"]).counters.received == sent["orders.eu.created"]
    assert pubsub(mesh5["gamma"]).counters.no_subscriber == 0


async def test_a_burst_of_publishes_leaves_at_the_end_of_the_turn(mesh5: dict[str, Node]) -> None:
    """Feature datagrams count once per queue fill towards the endpoint's early flush (32 writes), so a
    burst of publishes fills whole packets at the end of the loop turn instead of a flush every 32 (which
    cost fan-out to 3 nodes ~20 % of its rate)."""
    alpha = mesh5["alpha"]
    remote = mesh5["gamma"].subscribe("burst.>")
    await interest_known(mesh5, "alpha", "gamma", 1)
    await asyncio.sleep(0.1)  # let earlier ACKs and pings settle
    before = alpha.socket_counters()["packets_out"]
    for i in range(100):  # an unreliable publish does not suspend: all 100 in one turn
        await alpha.publish("burst.x", b"%d" % i)
    assert alpha.socket_counters()["packets_out"] == before
    assert {m.data for m in await drain(remote, 100)} == {b"%d" % i for i in range(100)}


async def test_local_subscribers_and_datagram_fan_out(mesh5: dict[str, Node]) -> None:
    local = mesh5["alpha"].subscribe("temp.*")
    remote = [mesh5[name].subscribe("temp.>") for name in ("gamma", "delta", "epsilon")]
    for name in ("gamma", "delta", "epsilon"):
        await interest_known(mesh5, "alpha", name, 1)
    for i in range(20):
        assert await mesh5["alpha"].publish("temp.kitchen", b"%d" % i) == 4
        await asyncio.sleep(0.005)
    assert [m.data for m in await drain(local, 20)] == [b"%d" % i for i in range(20)]
    for subscription in remote:  # loopback, paced: no loss expected
        assert {m.data for m in await drain(subscription, 20)} == {b"%d" % i for i in range(20)}
    too_big = b"x" * mesh5["alpha"].max_datagram_payload
    with pytest.raises(DatagramTooLargeError, match="reliable=True"):
        await mesh5["alpha"].publish("temp.kitchen", too_big)
    await mesh5["alpha"].publish("temp.kitchen", too_big, reliable=True)
    assert (await drain(remote[0], 1))[0].data == too_big
    with pytest.raises(InvalidSubjectError):
        await mesh5["alpha"].publish("temp.*", b"x")
    with pytest.raises(InvalidSubjectError):
        mesh5["alpha"].subscribe("temp..x")


async def test_queue_group_gets_each_message_once_with_a_fair_spread(mesh5: dict[str, Node]) -> None:
    members = {name: mesh5[name].subscribe("jobs.*", queue="workers") for name in ("gamma", "delta", "epsilon")}
    extra = mesh5["epsilon"].subscribe("jobs.*", queue="workers")  # a second member on one node
    watcher = mesh5["gamma"].subscribe("jobs.>")  # a plain subscriber still gets everything
    for publisher in ("alpha", "beta"):
        for name in ("gamma", "delta", "epsilon"):
            await interest_known(mesh5, publisher, name, 2 if name == "gamma" else 1)
    total = 300
    for i in range(total // 2):
        for publisher in ("alpha", "beta"):
            await mesh5[publisher].publish("jobs.build", f"{publisher} {i}".encode(), reliable=True)
    await drain(watcher, total)
    await asyncio.sleep(0.3)
    received = {name: [m.data for m in await drain(s, s.pending)] for name, s in members.items()}
    received["epsilon"] += [m.data for m in await drain(extra, extra.pending)]
    everything = [data for got in received.values() for data in got]
    assert len(everything) == total and len(set(everything)) == total
    for name, got in received.items():  # round robin per publisher over 3 nodes: a third each
        assert total * 0.25 <= len(got) <= total * 0.42, {n: len(g) for n, g in received.items()}
    assert members["epsilon"].delivered and extra.delivered  # the node spreads over its own members too


async def test_queue_member_killed_mid_stream_loses_no_reliable_message(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "gamma", "delta", "epsilon"])
    log = tmp_path / "delta.log"
    member = subprocess.Popen([sys.executable, str(MEMBER), str(configs["delta"].path), "jobs.*", "workers", str(log)])
    nodes = await start(configs, ["alpha", "gamma", "epsilon"])
    try:
        await nodes["alpha"].wait_connected(["delta"], timeout=20)
        await until(lambda: log.exists() and log.read_text().startswith("ready"), timeout=20)
        survivors = {name: nodes[name].subscribe("jobs.*", queue="workers") for name in ("gamma", "epsilon")}
        for name in ("gamma", "delta", "epsilon"):
            await interest_known(nodes, "alpha", name, 1)
        total = 400
        outcomes = []

        async def publish_all() -> None:
            for i in range(total):
                outcomes.append(await nodes["alpha"].publish("jobs.x", b"%d" % i, reliable=True))
                if i == total // 4:
                    member.send_signal(signal.SIGKILL)  # mid-stream, with messages in flight to it

        async with asyncio.timeout(30):
            await publish_all()
        assert member.wait(5) == -signal.SIGKILL
        assert len(outcomes) == total  # every publish returned: some member's node accepted each one
        await asyncio.sleep(0.3)
        by_survivors = [m.data for s in survivors.values() for m in await drain(s, s.pending)]
        by_killed = [line.encode() for line in log.read_text().splitlines()[1:]]
        assert len(by_survivors) == len(set(by_survivors))  # nothing twice among the surviving members
        assert set(by_survivors) | set(by_killed) == {b"%d" % i for i in range(total)}  # nothing lost
        assert by_killed and len(by_killed) < total // 2
        assert pubsub(nodes["alpha"]).counters.rerouted >= 0
    finally:
        if member.poll() is None:
            member.kill()
            member.wait(5)
        for node in nodes.values():
            await node.stop()


async def test_requests_by_subject(mesh5: dict[str, Node]) -> None:
    servers = []
    for me in ("gamma", "delta", "epsilon"):
        servers.append(mesh5[me].serve_subject("price.*", lambda msg, me=me: f"{msg.data.decode()} by {me}".encode(),
                                               queue="pricing"))
    for name in ("gamma", "delta", "epsilon"):
        await interest_known(mesh5, "alpha", name, 1)
    answers = [await mesh5["alpha"].request_subject("price.eur", b"%d" % i, timeout=5) for i in range(30)]
    by = Counter(a.split(b" by ")[1] for a in answers)
    assert by == {b"gamma": 10, b"delta": 10, b"epsilon": 10}
    assert answers[0].startswith(b"0 by ")
    with pytest.raises(NoRespondersError):
        await mesh5["alpha"].request_subject("nobody.here", b"?", timeout=2)
    silent = mesh5["beta"].subscribe("slow.thing")  # a subscriber that never responds
    await interest_known(mesh5, "alpha", "beta", 1)
    with pytest.raises(RequestTimeoutError):
        await mesh5["alpha"].request_subject("slow.thing", b"?", timeout=0.5)
    assert (await drain(silent, 1))[0].is_request
    local = mesh5["alpha"].serve_subject("self.echo", lambda msg: msg.data)
    assert await mesh5["alpha"].request_subject("self.echo", b"me") == b"me"
    local.close()
    for server in servers:
        server.close()
    await interest_known(mesh5, "alpha", "gamma", 0)


async def test_permissions_both_directions(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    rules = PubSubSection(peers=(PubSubPeer("alpha", publish=("public.>",), subscribe=("public.>",)),))
    configs["beta"] = dataclasses.replace(configs["beta"], pubsub=rules)
    nodes = await start(configs)
    alpha, beta = nodes["alpha"], nodes["beta"]
    try:
        secret_here = beta.subscribe("secret.x")
        public_here = beta.subscribe("public.x")
        await interest_known(nodes, "alpha", "beta", 2)
        # alpha -> beta: beta takes only public.> from alpha
        with pytest.raises(PublishError, match="may not|does not take") as refused:
            await alpha.publish("secret.x", b"no", reliable=True)
        assert refused.value.delivered == 0 and list(refused.value.failures) == ["beta"]
        await alpha.publish("secret.x", b"no either")  # as a datagram: dropped and counted there
        await alpha.publish("public.x", b"yes", reliable=True)
        assert (await drain(public_here, 1))[0].data == b"yes"
        await until(lambda: pubsub(beta).counters.refused_publish == 2)
        assert secret_here.pending == 0
        # beta -> alpha: alpha may subscribe only to public.> from beta
        secret_there = alpha.subscribe("secret.>")
        public_there = alpha.subscribe("public.*")
        await until(lambda: pubsub(beta).counters.refused_interest == 1)
        assert pubsub(beta)._remote.entries("alpha") == {("public.*", "")}
        assert await beta.publish("secret.x", b"x", reliable=True) == 1  # only beta's own subscriber
        await beta.publish("public.y", b"ok", reliable=True)
        assert (await drain(public_there, 1))[0].data == b"ok"
        assert secret_there.pending == 0 and pubsub(alpha).counters.received == 1
    finally:
        for node in nodes.values():
            await node.stop()


async def test_interest_follows_reconnects_and_restarts(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    nodes = await start(configs)
    alpha = nodes["alpha"]
    try:
        kept = alpha.subscribe("news.*")
        gone = alpha.subscribe("old.*")
        await interest_known(nodes, "beta", "alpha", 2)
        await nodes["beta"].stop()
        gone.close()  # while beta is away: it learns from the RESET when it is back
        nodes["beta"] = Node(configs["beta"])  # a new process of beta: it knew nothing
        await nodes["beta"].start()
        await nodes["beta"].wait_connected(timeout=15)
        await interest_known(nodes, "beta", "alpha", 1)
        assert await nodes["beta"].publish("news.today", b"fresh", reliable=True) == 1
        assert await nodes["beta"].publish("old.news", b"stale", reliable=True) == 0
        assert [m.data for m in await drain(kept, 1)] == [b"fresh"]
        # alpha restarts: beta forgets the old process's interest and learns the new one's
        await alpha.stop()
        nodes["alpha"] = alpha = Node(configs["alpha"])
        await alpha.start()
        await alpha.wait_connected(timeout=15)
        alpha.subscribe("fresh.*")
        await until(lambda: pubsub(nodes["beta"])._remote.entries("alpha") == {("fresh.*", "")})
    finally:
        for node in nodes.values():
            await node.stop()


async def test_interest_floods_are_bounded_and_resynced(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["beta"] = dataclasses.replace(configs["beta"], pubsub=PubSubSection(
        max_interest_per_peer=50, interest_rate=20, interest_burst=10))
    nodes = await start(configs)
    alpha, beta = nodes["alpha"], nodes["beta"]
    try:
        real = alpha.subscribe("real.one")
        await interest_known(nodes, "beta", "alpha", 1)
        # forged frames through alpha's seam: 400 entries (over the limit) in 40 frames (over the rate)
        for i in range(40):  # numbered by alpha's own sequence, so its later RESET is newer
            frame = pubsub(alpha)._interest._frame(wire.InterestOp.ADD, [(f"flood.{i}.{j}", "") for j in range(10)])
            assert alpha.features.send_control("beta", frame)
        counters = pubsub(beta).counters
        await until(lambda: counters.interest_frames_refused > 0 and counters.refused_interest_limit > 0)
        assert len(pubsub(beta)._remote.entries("alpha")) <= 50
        # beta asked alpha to resync: its view comes back to alpha's real interest
        await until(lambda: pubsub(beta)._remote.entries("alpha") == {("real.one", "")}, timeout=5)
        await beta.publish("real.one", b"still works", reliable=True)
        assert (await drain(real, 1))[0].data == b"still works"
        assert "alpha" in pubsub(beta).status()["interest"]["peers"]
    finally:
        for node in nodes.values():
            await node.stop()


async def test_a_subscription_ends_when_its_node_stops(tmp_path: Path) -> None:
    """The seam's node_stopping: an iterator left open ends (after what was waiting) instead of waiting forever."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    alpha = Node(configs["alpha"])
    await alpha.start()
    subscription = alpha.subscribe("news.>")
    await alpha.publish("news.today", b"read me")

    async def read_all() -> list[bytes]:
        return [msg.data async for msg in subscription]

    reader = asyncio.ensure_future(read_all())
    await asyncio.sleep(0.05)
    await alpha.stop()
    assert await asyncio.wait_for(reader, 5) == [b"read me"]
