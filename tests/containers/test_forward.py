"""UDP service forwarding across containers: an unmodified UDP echo program in node2, its clients in
node1, the direct path between them blocked (iptables in node2), so only the mesh carries the traffic.
Services and forwards are added to the running daemons by editing node.toml and SIGHUP."""

from __future__ import annotations

import json
import select
import time

import pytest

from containers import cluster as harness

pytestmark = pytest.mark.containers

PORT = 7000
ECHO = f"""
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", {PORT}))
print("ready", flush=True)
while True:
    data, source = sock.recvfrom(65536)
    sock.sendto(data, source)
"""
# argv: host port clients rounds -> prints {"sent": n, "own": replies that were the client's own}
CLIENT = """
import json, socket, sys
host, port, clients, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(clients)]
sent = own = 0
for r in range(rounds):
    for i, s in enumerate(socks):
        s.sendto(f"client {i} round {r}".encode(), (host, port)); sent += 1
    for i, s in enumerate(socks):
        s.settimeout(1.0)
        try:
            own += s.recv(65536) == f"client {i} round {r}".encode()
        except OSError:
            pass
print(json.dumps({"sent": sent, "own": own}))
"""


def poll(condition, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)
    return result


def clients(cluster: harness.Cluster, node: str, host: str, count: int = 4, rounds: int = 10) -> dict:
    proc = cluster.exec(node, "python3", "-c", CLIENT, host, str(PORT), str(count), str(rounds), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def forwarding(cluster: harness.Cluster, node: str) -> dict:
    status = cluster.status(node)
    return (status or {}).get("forwarding") or {}


def test_forwarding_across_containers_with_the_direct_path_blocked(image: str, measured) -> None:
    with harness.Cluster(2, image=image, prefix="qmfwd") as cluster:
        poll(cluster.full_mesh, timeout=60)
        echo = cluster.popen("node2", "python3", "-c", ECHO)
        try:
            ready, _, _ = select.select([echo.stdout], [], [], 20)
            assert ready and echo.stdout.readline() == b"ready\n"  # type: ignore[union-attr]
            cluster.netns("node2", "iptables", "-I", "INPUT", "-i", "eth0", "-p", "udp", "--dport", str(PORT),
                          "-j", "DROP")
            assert clients(cluster, "node1", cluster["node2"].ip, count=1, rounds=3)["own"] == 0  # blocked

            for node, section in (
                ("node2", f'[[services]]\nname = "echo"\ntarget = "127.0.0.1:{PORT}"\nallow = ["node1"]\n'),
                ("node1", f'[[forwards]]\nlisten = "127.0.0.1:{PORT}"\npeer = "node2"\nservice = "echo"\n'),
            ):
                with open(cluster[node].config_dir / "node.toml", "a") as toml:
                    toml.write("\n" + section)
                harness.run(["podman", "kill", "--signal", "HUP", cluster[node].container])
            poll(lambda: [f.get("state") for f in forwarding(cluster, "node1").get("forwards", [])] == ["ready"],
                 timeout=20)

            started = time.monotonic()
            result = clients(cluster, "node1", "127.0.0.1", count=4, rounds=25)
            elapsed = time.monotonic() - started
            assert result["sent"] == 100 and result["own"] >= 98, result  # UDP: a rare loss is allowed
            served = forwarding(cluster, "node2")["services"][0]
            assert served["name"] == "echo" and served["flows_active"] == 4
            assert served["counters"]["datagrams_in"] >= result["own"]
            measured.add("forwarded UDP echo across containers", f"{result['own']}/100 replies, 4 clients, "
                         f"{elapsed:.2f} s for 25 sequential rounds")
        finally:
            echo.kill()
            echo.wait(10)
