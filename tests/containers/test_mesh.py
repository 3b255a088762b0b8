"""A real 5-node mesh in containers under real faults: convergence, failure detection, recovery, and
reliable delivery through loss and partitions. Timers are those of deploy.cluster.TEST_TIMERS
(keepalive 1 s, dead_after 3 s). Every wait is bounded; every fault is undone in a finally."""

from __future__ import annotations

import concurrent.futures
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from deploy import cluster as harness

pytestmark = pytest.mark.containers

DEAD_AFTER = harness.TEST_TIMERS["dead_after"]
# A status poll is one `podman exec` (~0.3 s): measured times are late by up to about that much.
POLL = 0.35
DETECT_BOUND = DEAD_AFTER + 1.0 + POLL  # dead_after, plus one keepalive period of slack, plus the poll
REJOIN_BOUND = 2.0 + POLL


def state(status: dict[str, Any] | None, peer: str) -> str | None:
    if status is None:
        return None
    return next((p["state"] for p in status["peers"] if p["name"] == peer), None)


def watch(cluster: harness.Cluster, observers: list[str], done: Callable[[str, dict[str, Any] | None], bool],
          timeout: float) -> dict[str, float | None]:
    """Poll each observer's status concurrently from now; seconds until done(observer, status) held."""
    started = time.monotonic()

    def one(node: str) -> float | None:
        while time.monotonic() - started < timeout:
            if done(node, cluster.status(node)):
                return time.monotonic() - started
            time.sleep(0.02)
        return None

    with concurrent.futures.ThreadPoolExecutor(len(observers)) as pool:
        return dict(zip(observers, pool.map(one, observers)))


def fmt(times: dict[str, float | None]) -> str:
    values = [t for t in times.values() if t is not None]
    if not values:
        return "never"
    return f"max {max(values):.2f} s (min {min(values):.2f} s, {len(values)}/{len(times)} observers)"


@pytest.fixture
def mesh_ok(mesh: harness.Cluster) -> harness.Cluster:
    """The shared cluster, in full mesh before the test (an earlier test may have disturbed it)."""
    harness.wait_until(mesh.full_mesh, timeout=30, interval=0.1, what="full mesh before the test")
    return mesh


def assert_back(mesh: harness.Cluster, node: str, measured: harness.Measurements, what: str) -> None:
    """Measure from now until `node` and everyone else are in full mesh again; check the 2 s target."""
    others = [n for n in mesh.names() if n != node]
    back = watch(mesh, mesh.names(), lambda obs, st: (
        st is not None and all(state(st, p) == "connected" for p in (others if obs == node else [node]))),
        timeout=30)
    measured.add(f"{what}: back in full mesh", fmt(back))
    assert all(t is not None for t in back.values()), f"not back in full mesh within 30 s: {back}"
    assert max(back.values()) <= REJOIN_BOUND, f"{what}: full mesh took {fmt(back)} (target 2 s)"  # type: ignore[type-var]


def test_full_mesh_converged(mesh: harness.Cluster):
    """The session fixture measured convergence; here every node's own view is checked in detail."""
    for node, status in mesh.status_all().items():
        assert status is not None, mesh.logs(node)
        assert status["healthy"] is True
        assert status["peers_connected"] == status["peers_total"] == 4
        assert {p["name"] for p in status["peers"]} == set(mesh.names()) - {node}
        for peer in status["peers"]:
            assert peer["remote_address"].split(":")[0] == mesh[peer["name"]].ip


def test_kill_9_detected_and_restart_rejoins(mesh_ok: harness.Cluster, measured):
    mesh, victim = mesh_ok, "node5"
    others = [n for n in mesh.names() if n != victim]
    mesh.kill(victim)
    try:
        gone = watch(mesh, others, lambda _, st: state(st, victim) not in (None, "connected"), timeout=15)
        measured.add(f"kill -9: peers see it down (dead_after {DEAD_AFTER:g} s)", fmt(gone))
        assert all(t is not None for t in gone.values()), f"kill not detected within 15 s: {gone}"
        assert max(gone.values()) <= DETECT_BOUND  # type: ignore[type-var]
        for observer in others:  # the survivors keep their mesh
            assert {p["name"] for p in mesh.status(observer)["peers"] if p["state"] == "connected"} \
                == set(others) - {observer}
    finally:
        mesh.start(victim)
    assert_back(mesh, victim, measured, "kill -9 then start")


def test_graceful_restart_rejoins(mesh_ok: harness.Cluster, measured):
    mesh, victim = mesh_ok, "node3"
    started = time.monotonic()
    mesh.restart(victim)
    measured.add("graceful restart (SIGTERM, start)", f"{time.monotonic() - started:.2f} s")
    assert_back(mesh, victim, measured, "graceful restart")


def test_pause_detected_and_unpause_rejoins(mesh_ok: harness.Cluster, measured):
    mesh, victim = mesh_ok, "node4"
    others = [n for n in mesh.names() if n != victim]
    mesh.pause(victim)
    try:
        gone = watch(mesh, others, lambda _, st: state(st, victim) not in (None, "connected"), timeout=15)
        measured.add("pause: peers see it down", fmt(gone))
        assert all(t is not None for t in gone.values()), f"pause not detected within 15 s: {gone}"
        assert max(gone.values()) <= DETECT_BOUND  # type: ignore[type-var]
    finally:
        mesh.unpause(victim)
    assert_back(mesh, victim, measured, "unpause")


def test_partition_detected_and_heal_rejoins(mesh_ok: harness.Cluster, measured):
    mesh, a, b = mesh_ok, "node1", "node2"
    mesh.partition(a, b)
    try:
        gone = watch(mesh, [a, b], lambda obs, st: state(st, b if obs == a else a) not in (None, "connected"),
                     timeout=15)
        measured.add("partition: both sides see the link down", fmt(gone))
        assert all(t is not None for t in gone.values()), f"partition not detected within 15 s: {gone}"
        assert max(gone.values()) <= DETECT_BOUND  # type: ignore[type-var]
        assert mesh.full_mesh(["node3", "node4", "node5"]), "nodes outside the partition lost links"
        time.sleep(2)  # let the dial backoff grow a little, as a real outage would
    finally:
        mesh.heal(a, b)
    back = watch(mesh, [a, b], lambda obs, st: state(st, b if obs == a else a) == "connected", timeout=30)
    measured.add("heal: link back", fmt(back))
    assert all(t is not None for t in back.values()), f"link not back within 30 s of heal: {back}"
    assert max(back.values()) <= REJOIN_BOUND, f"heal: link back after {fmt(back)} (target 2 s)"  # type: ignore[type-var]


def test_5000_messages_exactly_once_through_loss_and_partition(mesh_ok: harness.Cluster, measured):
    mesh, src, dst, total = mesh_ok, "node1", "node2", 5000
    sent = [f"m{i:05d}" for i in range(total)]
    listener = mesh.listen(dst, kind="message", timeout=240)
    mesh.loss(src, 5)
    try:
        sender = mesh.popen(src, "quicmesh", "send", dst, "--lines", "--timeout", "60", "-")
        output: list[bytes] = []
        feeder = threading.Thread(target=lambda: output.extend(
            sender.communicate("".join(m + "\n" for m in sent).encode())))
        started = time.monotonic()
        feeder.start()
        assert listener.wait_for(lambda items: len(items) >= total // 3, timeout=90), \
            f"only {len(listener.items)} messages after 90 s"
        at_partition = len(listener.items)
        mesh.partition(src, dst)
        time.sleep(DEAD_AFTER + 1)  # long enough for the connection to be declared dead
        mesh.heal(src, dst)
        feeder.join(timeout=180)
        assert not feeder.is_alive(), "send --lines did not finish within 180 s"
        elapsed = time.monotonic() - started
        assert sender.returncode == 0, output
        # Every message was acknowledged: all are at the receiver; wait a moment for late duplicates.
        listener.wait_for(lambda items: len(items) >= total, timeout=30)
        time.sleep(1.5)
    finally:
        mesh.heal(src, dst)
        mesh.loss(src, 0)
        listener.stop()
    got = Counter(item["data"].decode() for _, item in listener.items if item["peer"] == src)
    lost = [m for m in sent if m not in got]
    duplicated = sum(n - 1 for n in got.values() if n > 1)
    unexpected = set(got) - set(sent)
    measured.add(f"{total} messages, 5 % loss + {DEAD_AFTER + 1:g} s partition",
                 f"{elapsed:.1f} s, {len(lost)} lost, {duplicated} duplicated "
                 f"(partition after {at_partition} delivered)")
    dropped = [line for line in listener.stderr if "dropped" in line]
    assert not dropped, f"the listener itself fell behind: {dropped}"
    assert not lost, f"{len(lost)} lost, e.g. {lost[:5]}"
    assert duplicated == 0, f"{duplicated} duplicates, e.g. {[m for m, n in got.items() if n > 1][:5]}"
    assert not unexpected


class Pacer:
    """Writes timestamped lines to a `quicmesh send --lines -` in a node at a steady rate."""

    def __init__(self, mesh: harness.Cluster, src: str, dst: str, tag: str, *, datagram: bool):
        args = ["quicmesh", "send", dst, "--lines", "--timeout", "60", "-"]
        if datagram:
            args.insert(3, "--datagram")
        self.tag = tag
        self.proc = mesh.popen(src, *args)

    def run(self, count: int, rate: float) -> None:
        assert self.proc.stdin is not None
        for i in range(count):
            self.proc.stdin.write(f"{self.tag} {i} {time.time():.6f}\n".encode())
            self.proc.stdin.flush()
            time.sleep(1 / rate)

    def close(self) -> subprocess.CompletedProcess[bytes]:
        out, err = self.proc.communicate(timeout=120)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def latencies(listener: harness.Listener, tag: str) -> list[float]:
    found = []
    for arrived, item in listener.items:
        if item["data"].startswith(tag.encode() + b" "):
            found.append(arrived - float(item["data"].split()[2]))
    return found


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_small_traffic_flows_past_a_large_message_under_loss(mesh_ok: harness.Cluster, measured):
    """Head-of-line: a 4 MiB message crawling through 5 % loss must not hold up small messages or
    datagrams (each message has its own stream; datagrams have none)."""
    mesh, src, dst = mesh_ok, "node3", "node4"
    count, rate, big = 150, 50.0, 4 * 1024 * 1024
    listener = mesh.listen(dst, timeout=240)
    results: dict[str, Any] = {}
    try:
        for phase in ("baseline", "loss"):
            big_sends: list[float] = []
            big_errors: list[bytes] = []
            stop = threading.Event()

            def send_big() -> None:  # 4 MiB messages back to back, so one is always in flight
                while not stop.is_set():
                    t = time.monotonic()
                    proc = mesh.exec(src, "quicmesh", "send", dst, "--timeout", "120", "-",
                                     input=b"B" * big, timeout=180)
                    if proc.returncode != 0:
                        big_errors.append(proc.stderr)
                        return
                    big_sends.append(time.monotonic() - t)

            worker = threading.Thread(target=send_big, daemon=True)
            if phase == "loss":
                mesh.loss(src, 5)
                worker.start()
                time.sleep(0.5)
            messages = Pacer(mesh, src, dst, f"msg-{phase}", datagram=False)
            datagrams = Pacer(mesh, src, dst, f"dgram-{phase}", datagram=True)
            pacers = [threading.Thread(target=p.run, args=(count, rate)) for p in (messages, datagrams)]
            for t in pacers:
                t.start()
            for t in pacers:
                t.join()
            in_flight = phase == "loss" and worker.is_alive()
            assert messages.close().returncode == 0
            datagrams.close()
            listener.wait_for(lambda items: len(latencies(listener, f"msg-{phase}")) >= count, timeout=60)
            time.sleep(0.5)
            stop.set()
            if worker.is_alive():
                worker.join(timeout=180)
            mesh.loss(src, 0)
            assert not big_errors, big_errors
            results[phase] = {
                "msg": latencies(listener, f"msg-{phase}"), "dgram": latencies(listener, f"dgram-{phase}"),
                "big": list(big_sends), "in_flight": in_flight}
    finally:
        mesh.loss(src, 0)
        listener.stop()

    for phase, r in results.items():
        assert len(r["msg"]) == count, f"{phase}: {len(r['msg'])}/{count} messages"
        measured.add(f"small message latency, {phase}",
                     f"p50 {pct(r['msg'], 50) * 1000:.1f} ms, p99 {pct(r['msg'], 99) * 1000:.1f} ms")
        measured.add(f"datagram latency, {phase}",
                     f"p50 {pct(r['dgram'], 50) * 1000:.1f} ms, p99 {pct(r['dgram'], 99) * 1000:.1f} ms, "
                     f"{len(r['dgram'])}/{count} delivered")
    loss = results["loss"]
    measured.add("4 MiB messages under 5 % loss",
                 f"{len(loss['big'])} sent, {statistics.mean(loss['big']):.2f} s each" if loss["big"] else "none")
    assert loss["in_flight"], "the large messages finished before the small traffic: nothing was tested"
    assert len(loss["dgram"]) >= 0.8 * count
    # Loss costs a retransmission here and there (~RTO), never the time of the 4 MiB transfer.
    assert pct(loss["msg"], 50) < 0.25 and pct(loss["msg"], 99) < 1.5
    assert pct(loss["dgram"], 99) < 1.0
