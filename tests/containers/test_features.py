"""Durable messages (issue 15, docs/DURABLE.md) and pub/sub (issue 17, docs/PUBSUB.md) between real nodes in
containers, across a network partition, driven only through the CLI and the control socket.

The daemons run under a bounded shell loop instead of as the container's only process, so a `kill -9` of a
daemon restarts it in the same container: its durable database, on the container's /var/tmp (a tmpfs: the
root is read-only and the harness mounts no data volume), outlives the process as a file on disk would.
Relaying is off, so a partition between two nodes is not routed around through the third.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from containers import cluster as harness

pytestmark = pytest.mark.containers

DEAD_AFTER = harness.TEST_TIMERS["dead_after"]
FEATURE_CONFIG = """
[storage]
path = "/var/tmp/state.db"

[relay]
use = false
"""
# At most this many daemon runs per container: each test kills a daemon at most once.
SUPERVISED_DAEMON = "for run in 1 2 3 4 5 6; do quicmesh run -c /etc/quicmesh/node.toml; done"


class FeatureCluster(harness.Cluster):
    """A cluster whose nodes have durable storage and no relaying."""

    def _bootstrap(self) -> None:
        super()._bootstrap()
        for member in self.members.values():
            with open(member.config_dir / "node.toml", "a") as toml:
                toml.write(FEATURE_CONFIG)


@pytest.fixture(scope="module")
def trio(image: str) -> Iterator[harness.Cluster]:
    with FeatureCluster(3, prefix="qmfeat", image=image, entrypoint="sh",
                        command=["-c", SUPERVISED_DAEMON]) as cluster:
        yield cluster


@pytest.fixture
def trio_ok(trio: harness.Cluster) -> harness.Cluster:
    """The module's cluster in full mesh before the test."""
    harness.wait_until(trio.full_mesh, timeout=60, interval=0.3, what="full mesh before the test")
    return trio


def crash_daemon(cluster: harness.Cluster, node: str) -> None:
    """SIGKILL the node's daemon; the supervising loop starts it again from the same files."""
    status = cluster.status(node)
    assert status is not None, cluster.logs(node)
    cluster.exec(node, "sh", "-c", f"kill -9 {status['pid']}", check=True)
    harness.wait_until(lambda: (cluster.status(node) or {}).get("pid") not in (None, status["pid"]),
                       timeout=30, interval=0.3, what=f"{node}'s daemon back after kill -9")


def outbox(cluster: harness.Cluster, node: str) -> dict[str, Any]:
    proc = cluster.exec(node, "quicmesh", "outbox", "--json", check=True)
    return json.loads(proc.stdout)


def send_durable(cluster: harness.Cluster, src: str, dst: str, lines: list[str]) -> subprocess.CompletedProcess[bytes]:
    """One durable message per line; returns once all are committed to src's outbox (not delivered)."""
    return cluster.exec(src, "quicmesh", "send", dst, "--durable", "--lines", "-",
                        input="".join(line + "\n" for line in lines).encode(), timeout=60)


def wait_quiet(listener: harness.Listener, quiet: float, timeout: float) -> int:
    """Wait until the listener got nothing new for `quiet` s; the item count then."""
    deadline = time.monotonic() + timeout
    seen = -1
    while len(listener.items) != seen and time.monotonic() < deadline:
        seen = len(listener.items)
        time.sleep(quiet)
    assert len(listener.items) == seen, f"still receiving after {timeout} s"
    return seen


def test_durable_messages_exactly_once_across_partition_and_kill_9(trio_ok: harness.Cluster, measured):
    """2,000 durable messages node1 -> node2: three quarters sent before a partition that cuts their
    delivery, the rest during it; both daemons killed with SIGKILL during the partition and restarted from
    their databases; heal. The application (a `quicmesh listen`) gets each exactly once: here that holds
    for the application too, because both kills come after the receiver went quiet (every item it handed
    out acknowledged); across a receiver crash mid-stream DURABLE.md promises at least once to it."""
    mesh, src, dst, total = trio_ok, "node1", "node2", 2000
    sent = [f"d{i:05d}" for i in range(total)]
    before, during = sent[:total * 3 // 4], sent[total * 3 // 4:]
    listeners = [mesh.listen(dst, kind="message", timeout=300)]
    try:
        sender = mesh.popen(src, "quicmesh", "send", dst, "--durable", "--lines", "-")
        sender.stdin.write("".join(m + "\n" for m in before).encode())  # type: ignore[union-attr]
        sender.stdin.close()  # type: ignore[union-attr]
        assert listeners[0].wait_for(lambda items: len(items) >= total // 20, timeout=60), \
            f"only {len(listeners[0].items)} delivered after 60 s"
        mesh.partition(src, dst)  # while the first part is still being delivered
        assert sender.wait(timeout=60) == 0, sender.stderr.read()  # type: ignore[union-attr]
        partitioned_at, received_at_cut = time.monotonic(), len(listeners[0].items)
        proc = send_durable(mesh, src, dst, during)
        assert proc.returncode == 0, f"durable sends refused while the peer is unreachable: {proc.stderr}"
        received_before_heal = wait_quiet(listeners[0], quiet=1.5, timeout=30)
        crash_daemon(mesh, dst)
        crash_daemon(mesh, src)
        listeners[0].stop()  # it ended with its daemon
        listeners.append(mesh.listen(dst, kind="message", timeout=300))
        pending_at_heal = outbox(mesh, src)["outbox_messages"]
        assert pending_at_heal >= total - received_before_heal, \
            f"{pending_at_heal} pending in the restarted sender, {received_before_heal} of {total} received"
        healed_at = time.monotonic()
        mesh.heal(src, dst)
        drained = harness.wait_until(lambda: outbox(mesh, src)["outbox_messages"] == 0, timeout=90,
                                     interval=0.2, what="sender's outbox empty after heal")
        listeners[1].wait_for(lambda items: received_before_heal + len(items) >= total, timeout=30)
        time.sleep(1.5)  # late duplicates would come now
    finally:
        mesh.heal(src, dst)
        for listener in listeners:
            listener.stop()
    got = Counter(item["data"].decode() for listener in listeners for _, item in listener.items
                  if item["peer"] == src)
    lost = [m for m in sent if m not in got]
    duplicated = {m: n for m, n in got.items() if n > 1}
    unacknowledged = pending_at_heal + received_before_heal - total  # received, but the ack was cut off
    measured.add(f"durable: {total} msgs, partition + kill -9 of both daemons",
                 f"{len(lost)} lost, {sum(duplicated.values()) - len(duplicated)} duplicated; cut after "
                 f"{received_at_cut} delivered; at heal ({healed_at - partitioned_at:.1f} s later) {pending_at_heal} "
                 f"pending, {unacknowledged} of them already received; outbox drained {drained:.2f} s after heal")
    dropped = [line for listener in listeners for line in listener.stderr if "dropped" in line]
    assert not dropped, f"a listener fell behind (its items were not acknowledged): {dropped}"
    assert not lost, f"{len(lost)} lost, e.g. {lost[:5]}"
    assert not duplicated, f"duplicates: {list(duplicated.items())[:5]}"
    assert set(got) == set(sent)


class Subscriber:
    """`quicmesh sub PATTERN --json` inside a node; what it printed is read once it is stopped."""

    def __init__(self, cluster: harness.Cluster, node: str, pattern: str, timeout: float = 120):
        self.cluster, self.node = cluster, node
        self.proc = cluster.popen(node, "sh", "-c", 'echo $$; exec "$@"', "sub", "quicmesh", "sub", pattern,
                                  "--json", "--timeout", str(timeout), stdin=subprocess.DEVNULL)
        self.pid = int(self.proc.stdout.readline())  # type: ignore[union-attr]

    def stop(self) -> tuple[Counter[str], str]:
        """Stop it; how many times it got each payload, and its stderr."""
        self.cluster.exec(self.node, "sh", "-c", f"kill {self.pid}")
        out, err = self.proc.communicate(timeout=15)
        return Counter(base64.b64decode(json.loads(line)["data"]).decode()
                       for line in out.splitlines()), err.decode(errors="replace")


def interest_from(cluster: harness.Cluster, node: str, peer: str) -> int:
    """Interest entries `node` holds for `peer` (0 when it has none, or does not answer)."""
    status = cluster.status(node) or {}
    return status.get("pubsub", {}).get("interest", {}).get("peers", {}).get(peer, 0)


def connected(cluster: harness.Cluster, node: str, peer: str) -> bool:
    status = cluster.status(node) or {"peers": []}
    return any(p["name"] == peer and p["state"] == "connected" for p in status["peers"])


def publish(cluster: harness.Cluster, node: str, subject: str, data: str) -> int:
    """A reliable `quicmesh pub`; the number of nodes that accepted it."""
    proc = cluster.exec(node, "quicmesh", "pub", subject, data, "--reliable", timeout=30)
    assert proc.returncode == 0, proc.stderr
    return int(re.search(rb"to (\d+) node", proc.stderr).group(1))  # type: ignore[union-attr]


# Runs in the publisher's container: connects to its daemon first, then makes one reliable publish when a line
# comes on stdin (so it goes out within milliseconds of the cut, not after a CLI's start-up), and prints the
# reply with the time.time() it came (the containers share the host's clock).
CUT_PUBLISHER = """
import asyncio, base64, json, os, sys, time
from quicmesh.ops.control import ControlClient

async def main():
    async with await ControlClient.connect(os.environ["QUICMESH_CONTROL_SOCKET"]) as client:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        reply = await client.call("publish", subject=sys.argv[1], data=base64.b64encode(sys.argv[2].encode()).decode(),
                                  reliable=True)
        print(json.dumps({"t": time.time(), **reply}), flush=True)

asyncio.run(main())
"""


def test_pubsub_interest_and_reliable_publish_across_partition(trio_ok: harness.Cluster, measured):
    """Subscribers on node2 and node3, publisher on node1; node2 is cut off and comes back. What PUBSUB.md
    guarantees for reliable publishing, asserted exactly:
    - a publish made while node2's connection still looked up targets node2, and node2 gets it exactly once
      after the heal (resent on the new connection: same process);
    - once node1 saw node2 go, a publish targets only node3; node2 never gets it (no store);
    - after the heal node2's interest comes back (its RESET), and the next publish reaches it again."""
    mesh, pub, away, stays, subject = trio_ok, "node1", "node2", "node3", "feat.orders"
    subscribers = {node: Subscriber(mesh, node, "feat.>") for node in (away, stays)}
    results: dict[str, tuple[Counter[str], str]] = {}
    cut_publish = mesh.popen(pub, "python3", "-c", CUT_PUBLISHER, subject, "at-the-cut")
    try:
        assert cut_publish.stdout.readline() == b"ready\n", cut_publish.stderr.read()  # type: ignore[union-attr]
        harness.wait_until(lambda: interest_from(mesh, pub, away) and interest_from(mesh, pub, stays),
                           timeout=20, interval=0.3, what="node1 knowing both subscribers' interest")
        assert publish(mesh, pub, subject, "first") == 2
        mesh.isolate(away)
        cut_publish.stdin.write(b"go\n")  # type: ignore[union-attr]
        cut_publish.stdin.flush()  # type: ignore[union-attr]
        harness.wait_until(lambda: not connected(mesh, pub, away), timeout=DEAD_AFTER + 10, interval=0.3,
                           what=f"{pub} seeing {away} down")
        assert interest_from(mesh, pub, away) == 0, "interest of a lost peer kept"
        while_away = [f"while-away-{i}" for i in range(3)]
        assert [publish(mesh, pub, subject, data) for data in while_away] == [1, 1, 1]
        healed_at = time.time()
        mesh.rejoin(away)
        interest_back = harness.wait_until(lambda: interest_from(mesh, pub, away) > 0, timeout=30,
                                           interval=0.2, what=f"{away}'s interest back at {pub}")
        out, err = cut_publish.communicate(timeout=60)
        assert cut_publish.returncode == 0, err
        reply = json.loads(out)
        assert reply["nodes"] == 2, reply
        assert publish(mesh, pub, subject, "after-heal") == 2
        time.sleep(1.0)  # late duplicates would come now
    finally:
        mesh.rejoin(away)
        if cut_publish.poll() is None:
            cut_publish.kill()
        for node, subscriber in subscribers.items():
            results[node] = subscriber.stop()
    measured.add("pub/sub: interest back at the publisher after heal", f"{interest_back:.2f} s")
    measured.add("pub/sub: reliable publish made at the cut, accepted", f"{reply['t'] - healed_at:.2f} s after heal")
    assert results[away][0] == Counter(["first", "at-the-cut", "after-heal"]), results[away]
    assert results[stays][0] == Counter(["first", "at-the-cut", *while_away, "after-heal"]), results[stays]
