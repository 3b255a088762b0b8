"""The namespace harness itself: hosts reach each other, a block really blocks (and only that pair), heal heals."""

from __future__ import annotations

import sys

from netns.topology import Topology, run

PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(3):
    try:  # a DROP in OUTPUT fails the send itself (EPERM); one in INPUT, the reply
        s.sendto(b"ping", (sys.argv[1], 9999))
        s.recvfrom(64)
        print("reached")
        break
    except OSError:
        pass
else:
    print("blocked")
"""
ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("ready", flush=True)
while True:
    data, source = s.recvfrom(64)
    s.sendto(data, source)
"""


def reaches(net: Topology, source: str, target: str) -> bool:
    result = net.run(source, [sys.executable, "-c", PROBE, net.address(target)], timeout=10)
    return result.stdout.strip() == "reached"


def test_block_cuts_one_pair_and_heal_restores_it() -> None:
    with Topology(["a", "b", "c"]) as net:
        for host in ("b", "c"):
            echo = net.popen(host, [sys.executable, "-u", "-c", ECHO], stdout=-1)
            assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        assert reaches(net, "a", "b") and reaches(net, "a", "c")
        net.block("a", "c")
        assert not reaches(net, "a", "c")
        assert reaches(net, "a", "b")
        net.heal("a", "c")
        assert reaches(net, "a", "c")


def test_namespaces_are_removed_on_exit() -> None:
    with Topology(["x", "y"]) as net:
        names = [host.namespace for host in net.hosts.values()]
        assert all(name in run(["ip", "netns", "list"]).stdout for name in names)
    listed = run(["ip", "netns", "list"]).stdout
    assert not any(name in listed for name in names)
