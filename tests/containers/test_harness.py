"""The harness itself, with plain UDP programs instead of quicmesh: faults do what they claim, and
nothing is left behind, whatever way a run ends. Needs no working quicmesh daemon."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from containers import cluster as harness

pytestmark = pytest.mark.containers

ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 4433))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""
# Sends n datagrams one at a time to host:4433; prints how many came back and how long it took.
PROBE = """
import socket, sys, time
host, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.05)
ok, started = 0, time.monotonic()
for _ in range(n):
    s.sendto(b"x" * size, (host, 4433))
    try:
        s.recvfrom(65535)
        ok += 1
    except TimeoutError:
        pass
print(ok, time.monotonic() - started)
"""


@pytest.fixture(scope="module")
def echo(image: str):
    with harness.Cluster(3, prefix="qmharness", image=image, entrypoint="python3", command=["-c", ECHO],
                         pki=False) as cluster:
        yield cluster


def probe(cluster: harness.Cluster, src: str, dst: str, n: int = 20, size: int = 32) -> tuple[int, float]:
    proc = cluster.exec(src, "python3", "-c", PROBE, cluster[dst].ip, str(n), str(size), check=True)
    ok, seconds = proc.stdout.split()
    return int(ok), float(seconds)


def test_containers_reach_each_other(echo):
    assert probe(echo, "node1", "node2")[0] == 20
    assert probe(echo, "node3", "node1")[0] == 20


def test_partition_and_heal(echo):
    echo.partition("node1", "node2")
    try:
        assert probe(echo, "node1", "node2", n=10)[0] == 0
        assert probe(echo, "node2", "node1", n=10)[0] == 0
        assert probe(echo, "node1", "node3")[0] == 20  # only that pair is cut
    finally:
        echo.heal("node1", "node2")
    assert probe(echo, "node1", "node2")[0] == 20


def test_isolate_and_rejoin(echo):
    echo.isolate("node3")
    try:
        assert probe(echo, "node1", "node3", n=10)[0] == 0
        assert probe(echo, "node3", "node2", n=10)[0] == 0
        assert probe(echo, "node1", "node2")[0] == 20
    finally:
        echo.rejoin("node3")
    assert probe(echo, "node1", "node3")[0] == 20


def test_random_loss_is_silent_and_about_right(echo):
    # 20 % each way: a round trip survives with 0.8 * 0.8 = 64 %. The echo server would die of the EPERM
    # an OUTPUT-chain DROP gives sendto(); it must survive: the loss is on the wire, not in the socket.
    echo.loss("node2", 20)
    try:
        ok, _ = probe(echo, "node1", "node2", n=300)
    finally:
        echo.loss("node2", 0)
    assert 0.50 * 300 < ok < 0.78 * 300
    assert probe(echo, "node1", "node2", n=50)[0] == 50


def test_bandwidth_limit(echo):
    echo.bandwidth("node1", "1mbit")
    try:
        ok, seconds = probe(echo, "node1", "node2", n=60, size=1200)  # 576 kbit
    finally:
        echo.bandwidth("node1", None)
    assert ok == 60 and seconds > 0.4
    assert probe(echo, "node1", "node2", n=60, size=1200)[1] < 0.3


def test_kill_start_pause_restart_keep_addresses(echo):
    echo.kill("node2")
    assert probe(echo, "node1", "node2", n=5)[0] == 0
    echo.start("node2")
    assert harness.wait_until(lambda: probe(echo, "node1", "node2", n=3)[0] == 3, timeout=10) < 10
    echo.pause("node2")
    try:
        assert probe(echo, "node1", "node2", n=5)[0] == 0
    finally:
        echo.unpause("node2")
    assert probe(echo, "node1", "node2")[0] == 20
    echo.restart("node3")
    assert harness.wait_until(lambda: probe(echo, "node1", "node3", n=3)[0] == 3, timeout=10) < 10


OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])  # the repository root: the harness is tests/containers/cluster.py
from tests.containers import cluster as harness
with harness.Cluster(2, prefix="qmharness", entrypoint="sleep", command=["600"], pki=False) as c:
    print(c.name, flush=True)
    time.sleep(600)
"""


def _exists(name: str) -> bool:
    containers = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={harness.CLUSTER_LABEL}={name}"],
                                capture_output=True, text=True).stdout.split()
    return bool(containers) or name in harness.list_clusters()


def _start_owner() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(harness.REPO)], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert name and _exists(name), "owner process did not start its cluster"
    return proc, name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cleanup_when_the_owner_is_signalled(image, sig):
    proc, name = _start_owner()
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    assert not _exists(name)


def test_leftovers_of_killed_runs_are_removed_and_live_runs_kept(image):
    live, live_name = _start_owner()
    dead, dead_name = _start_owner()
    dead.kill()  # SIGKILL: nothing can clean up, so the next run does
    dead.wait(timeout=10)
    try:
        assert _exists(dead_name)
        removed = harness.remove_leftovers("qmharness")
        assert dead_name in removed and not _exists(dead_name)
        assert live_name not in removed and _exists(live_name)
    finally:
        live.terminate()
        live.wait(timeout=60)
    assert not _exists(live_name)
