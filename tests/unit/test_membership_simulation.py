"""The membership protocol simulated on many sans-I/O cores (quicmesh/bench/membership_sim.py, issue 16).

No sockets: one process, a simulated clock and network. Announcements carry dummy chain and signature bytes:
the core works on announcements the runtime has already verified, so signatures are not the edge this tests
(test_membership_announcement.py covers them). The 1,000-member run is the bench
(``python -m quicmesh.bench.membership_sim --members 1000``, numbers in docs); here 200 members, with
shorter idle_close and member_timeout so that the whole scenario stays within a few seconds of wall time.
"""

from __future__ import annotations

from quicmesh.bench.membership_sim import MeshSimulation, node_name, run_scenario
from quicmesh.config import MeshSection
from quicmesh.membership.core import RUMOR_FANOUT


def test_200_members_from_one_seed_converge_with_bounded_traffic_and_connections() -> None:
    s = MeshSection(members="any-certified", idle_close=5.0, member_timeout=35.0)
    members, talkers = 200, 5
    r = run_scenario(members, s, talkers=talkers, talk_for=5.0)
    assert r["mode"] == "on-demand"
    assert r["converge_s"] is not None and r["converge_s"] < 10.0
    assert r["convergence"]["messages_per_node_s"] < 250
    assert r["convergence"]["bytes_per_node_s"] < 400 * 1024
    # Steady state: every re-announcement reaches each node about once plus RUMOR_FANOUT forwards, one sync/s.
    steady = r["steady"]
    assert steady["messages_per_node_s"] < members / s.announce_interval * (RUMOR_FANOUT + 1) + 3 / s.gossip_interval
    # On demand: neighbors chosen by us and by others, and the seed, not the full mesh. Every node keeps its
    # seed (the spec), so the seed holds one connection per member.
    held = steady["connections"]
    assert held["mean"] <= 2 * s.neighbors + 3 and held["p99_non_seed"] <= 5 * s.neighbors
    assert held["seed"] <= 5 * s.neighbors  # joined nodes let their seed go (it held all 198 before)
    busy = r["traffic"]["connections"]
    assert held["mean"] + talkers <= busy["mean"] <= held["mean"] + 2 * talkers + 2
    assert r["after_traffic"]["connections"]["mean"] <= held["mean"] + 1  # idle ones closed again
    assert r["join"]["knows_everyone_s"] is not None and r["join"]["knows_everyone_s"] < 2.0
    assert r["join"]["known_by_everyone_s"] is not None and r["join"]["known_by_everyone_s"] < 10.0
    assert r["leave"]["everyone_knows_s"] is not None and r["leave"]["everyone_knows_s"] < 5.0
    assert r["leave"]["reasons"] == ["left"]
    kill = r["kill"]
    assert kill["reasons"] == [f"silent for {s.member_timeout:g}s"]
    assert kill["first_knows_s"] >= s.member_timeout - s.announce_interval  # not before it could be silent
    assert kill["everyone_knows_s"] is not None
    assert kill["everyone_knows_s"] <= s.member_timeout * (1 + 1 / 16) + 5.0  # + dead_after, the check's step
    assert r["converged_at_end"]


def test_a_small_mesh_is_a_full_mesh() -> None:
    members = 30
    sim = MeshSimulation(members, MeshSection(members="any-certified"))
    for index in range(members):
        sim.start(node_name(index), 0.01 * index)
    converged = sim.run_until(30.0, sim.converged)
    assert converged is not None and converged < 3.0
    full = sim.run_until(30.0, lambda: set(sim.connection_counts().values()) == {members - 1})
    assert full is not None and full < 5.0
    before = sim.sample()
    sim.run_until(full + 60.0)
    after = sim.sample()
    assert sim.converged() and set(sim.connection_counts().values()) == {members - 1}
    # Two re-announcement rounds: each reaches every node directly (ours go to every connected peer) and
    # is rumored on; syncs agree and stay one small message each way.
    per_node_s = (after.messages - before.messages) / (after.time - before.time) / members
    assert per_node_s < members / 30.0 * (RUMOR_FANOUT + 1) + 3


def test_an_announcement_not_rumored_still_arrives_by_anti_entropy() -> None:
    """With the push path cut (every push refused by the rate limit), syncs alone converge the mesh."""
    s = MeshSection(members="any-certified", announce_rate=1e-9, announce_burst=0)
    members = 40
    sim = MeshSimulation(members, s)
    for index in range(members):
        sim.start(node_name(index), 0.0)
    converged = sim.run_until(60.0, sim.converged)
    assert converged is not None and converged < 20.0
    refused = sum(n.core.counters()["rejected"].get("rate limit", 0) for n in sim.up())
    assert refused > members
