"""Open membership (issue 16, docs/MEMBERSHIP.md) in real containers: eight nodes whose configs name no peer
and only node1 as their seed form a full mesh; a node cut off by iptables, and a container killed, are
marked gone by every other member after member_timeout and are members again once back.

Each node.toml is what `quicmesh-pki join-bundle` writes (pki.join.render_join_toml: [mesh] members =
"any-certified", seeds = node1, the container's address advertised), plus short test timers.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from containers import cluster as harness
from pki.join import render_join_toml

pytestmark = pytest.mark.containers

SIZE = 8
SEED = "node1"
ANNOUNCE_INTERVAL = 1.0
MEMBER_TIMEOUT = 3.0
DEAD_AFTER = harness.TEST_TIMERS["dead_after"]
GONE_BOUND = DEAD_AFTER + MEMBER_TIMEOUT + 10.0  # noticed dead, then silent for member_timeout; slack for 2 cores
BACK_BOUND = 60.0  # a node back from isolation redials its seed with a backoff of up to 30 s


class SeedCluster(harness.Cluster):
    """Nodes that know only node1's address: join-bundle configs instead of bootstrap's [[peers]] lists."""

    def _bootstrap(self) -> None:
        super()._bootstrap()  # the CA, a key and certificate per node, files owned by the node user
        seed = f"{self[SEED].ip}:{harness.PORT}"
        timers = "".join(f"{key} = {value}\n" for key, value in self.timers.items())
        for member in self.members.values():
            config = render_join_toml(self.mesh, member.name, listen=f"0.0.0.0:{harness.PORT}", seeds=[seed],
                                      advertise=[f"{member.ip}:{harness.PORT}"], crl=True)
            config += f"announce_interval = {ANNOUNCE_INTERVAL}\nmember_timeout = {MEMBER_TIMEOUT}\n"
            (member.config_dir / "node.toml").write_text(config + "\n[timers]\n" + timers)


@pytest.fixture(scope="module")
def seeded(image: str, measured: harness.Measurements) -> Iterator[SeedCluster]:
    with SeedCluster(SIZE, prefix="qmseed", image=image) as cluster:
        try:
            harness.wait_until(cluster.full_mesh, timeout=120, interval=0.5, what="full mesh from one seed")
        except TimeoutError:
            pytest.fail("8 containers knowing one seed did not form a full mesh in 120 s:\n" + "\n".join(
                f"{node}: {members(cluster, node)}\n{cluster.logs(node, 10)}" for node in cluster.names()))
        measured.add("membership: full mesh of 8 containers from one seed",
                     f"{time.time() - cluster.up_at:.1f} s after the last container started")
        yield cluster


def members(cluster: harness.Cluster, node: str) -> dict[str, Any] | None:
    """`quicmesh members --json` inside the node; None when its daemon does not answer."""
    try:
        proc = cluster.exec(node, "quicmesh", "members", "--json", timeout=10)
    except harness.ClusterError:
        return None
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def state_of(document: dict[str, Any] | None, name: str) -> tuple[str, str | None, bool] | None:
    """(state, gone_reason, connected) of member ``name`` in a members document."""
    found = next((m for m in (document or {}).get("members", ()) if m["name"] == name), None)
    return None if found is None else (found["state"], found["gone_reason"], found["connected"])


def everyone_sees(cluster: harness.Cluster, nodes: list[str], name: str, state: str, reason: str = "") -> bool:
    """Whether every one of ``nodes`` lists ``name`` in ``state`` (asked concurrently: ~0.3 s per exec)."""
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        documents = list(pool.map(lambda node: members(cluster, node), nodes))
    seen = [state_of(document, name) for document in documents]
    return all(s is not None and s[0] == state and (s[1] or "").startswith(reason) for s in seen)


def gone_times(cluster: harness.Cluster, nodes: list[str], name: str, since: float) -> list[float]:
    """When each of ``nodes`` logged ``name`` gone (event member_gone), in seconds after ``since`` (time.time():
    the containers share the host's clock); exact where polling `quicmesh members` is ~1 s coarse."""
    times = []
    for node in nodes:
        stamps = [line.split()[0] for line in cluster.logs(node, 400).splitlines()
                  if "event=member_gone" in line and f"peer={name} " in line]
        assert stamps, f"{node} logged no member_gone for {name}"
        at = datetime.datetime.strptime(stamps[-1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
        times.append(at.timestamp() - since)
    return times


def wait_gone_everywhere(cluster: harness.Cluster, name: str, since: float) -> list[float]:
    """Wait until every other node lists ``name`` gone (silent); when each did, in seconds after ``since``,
    none before member_timeout (the connection has to go first, then the silence to last)."""
    others = [node for node in cluster.names() if node != name]
    harness.wait_until(lambda: everyone_sees(cluster, others, name, "gone", "silent"), timeout=GONE_BOUND,
                       interval=0.3, what=f"{name} gone (silent) on all")
    took = gone_times(cluster, others, name, since)
    assert min(took) >= MEMBER_TIMEOUT, took
    return took


def test_eight_containers_knowing_one_seed_form_a_full_mesh(seeded: SeedCluster) -> None:
    for node in ("node2", "node8"):
        document = members(seeded, node)
        assert document is not None and document["open"] and document["seeds"] == [f"{seeded[SEED].ip}:4433"]
        others = {m["name"]: m for m in document["members"]}
        assert set(others) == set(seeded.names()) - {node}
        for name, found in others.items():  # each as it announced itself: its container's address
            assert found["state"] == "alive" and found["connected"], found
            assert found["addresses"] == [f"{seeded[name].ip}:4433"]


def test_an_isolated_member_is_gone_after_member_timeout_and_back_after_heal(
        seeded: SeedCluster, measured: harness.Measurements) -> None:
    cut = "node8"
    others = [node for node in seeded.names() if node != cut]
    harness.wait_until(seeded.full_mesh, timeout=60, interval=0.5, what="full mesh before the cut")
    cut_at = time.time()
    seeded.isolate(cut)
    try:
        took = wait_gone_everywhere(seeded, cut, cut_at)
        measured.add(f"membership: isolated member gone (silent {MEMBER_TIMEOUT:g}s) on all 7",
                     f"{min(took):.1f}-{max(took):.1f} s after the cut (dead_after {DEAD_AFTER:g} s + member_timeout)")
        harness.wait_until(lambda: everyone_sees(seeded, [cut], SEED, "gone", "silent"), timeout=GONE_BOUND,
                           interval=0.3, what=f"{cut}, alone, giving up on its seed")
    finally:
        seeded.rejoin(cut)
    back = harness.wait_until(seeded.full_mesh, timeout=BACK_BOUND, interval=0.5, what=f"{cut} back in the mesh")
    assert everyone_sees(seeded, others, cut, "alive")
    measured.add("membership: isolated member back in the full mesh", f"{back:.1f} s after the heal "
                 f"(isolated {time.time() - cut_at - back:.1f} s)")


def test_a_killed_container_is_gone_after_member_timeout_and_back_after_restart(
        seeded: SeedCluster, measured: harness.Measurements) -> None:
    killed = "node5"
    harness.wait_until(seeded.full_mesh, timeout=60, interval=0.5, what="full mesh before the kill")
    killed_at = time.time()
    seeded.kill(killed)
    took = wait_gone_everywhere(seeded, killed, killed_at)
    measured.add(f"membership: killed member gone (silent {MEMBER_TIMEOUT:g}s) on all 7",
                 f"{min(took):.1f}-{max(took):.1f} s after the kill")
    seeded.start(killed)
    back = harness.wait_until(seeded.full_mesh, timeout=BACK_BOUND, interval=0.5, what=f"{killed} back in the mesh")
    measured.add("membership: killed member restarted, back in the full mesh", f"{back:.1f} s after podman start")
