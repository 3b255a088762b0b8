"""Path MTU discovery (issue 20) between real hosts: two namespaces on a bridge of 1500-byte veths.

Each host runs a small driver (a real ``quicmesh.Node`` in its own process) that reports what it sees on
stdout. On that path packets grow from 1200 bytes to 1472 (IPv4 on 1500-byte Ethernet) and no further: a
larger probe cannot leave (DF is set, so the kernel refuses instead of fragmenting). Then an iptables rule on
the receiver drops every packet longer than 1,300 bytes without a word (a black hole): a reliable message
sent at the large size must still arrive, because the sender notices the loss, finds its probes of the
current size lost too, and falls back to 1200-byte packets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns.topology import Topology
from pki.bootstrap import NodeSpec, bootstrap
from quicmesh.config import Address, load_config, render_config

HERE = Path(__file__).resolve().parent
PORT = 4433
TIMERS = {"keepalive": 0.5, "dead_after": 3.0, "backoff_min": 0.2, "backoff_max": 1.0}
#: IP length of the largest packet the black hole lets through: 1200-byte UDP payloads (+ 28) pass.
BLACK_HOLE_ABOVE = 1300

DRIVER = """
import asyncio, json, sys, time
from quicmesh import Node
from quicmesh.config import load_config

async def main(config_path, peer):
    node = Node(load_config(config_path))
    await node.start()
    await node.wait_connected(timeout=20)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def receive():
        async for item in node.received():
            print(json.dumps({"received": len(item.data)}), flush=True)

    receiving = asyncio.ensure_future(receive())
    while line := (await reader.readline()).decode().strip():
        if line == "limit":
            print(json.dumps({"limit": node.features.datagram_limit(peer)}), flush=True)
        elif line.startswith("send "):
            started = time.monotonic()
            try:
                await asyncio.wait_for(node.send(peer, bytes(int(line.split()[1]))), 30)
                print(json.dumps({"sent": time.monotonic() - started}), flush=True)
            except Exception as error:
                print(json.dumps({"error": repr(error)}), flush=True)
    await node.stop()
    receiving.cancel()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@dataclasses.dataclass
class Driver:
    process: subprocess.Popen[bytes]

    def ask(self, command: str, key: str, timeout: float = 40.0) -> Any:
        """Send a command line; the value of ``key`` in the first reply line that has it."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"driver exited with {self.process.wait(5)}")
            reply = json.loads(line)
            if key in reply or "error" in reply:
                return reply.get(key, reply)
        raise AssertionError(f"no {key!r} within {timeout:g}s")


@pytest.fixture
def net() -> Iterator[Topology]:
    with Topology(["a", "b"]) as topology:
        yield topology


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmpmtu-") as name:
        yield Path(name)


def start_driver(net: Topology, directory: Path, name: str, peer: str) -> Driver:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent.parent),
                                                                    os.environ.get("PYTHONPATH")]))}
    process = net.popen(name, [sys.executable, "-c", DRIVER, str(directory / name / "node.toml"), peer],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    return Driver(process)


def wait_limit(driver: Driver, wanted: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (limit := driver.ask("limit", "limit")) != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return limit


def test_packets_grow_to_the_ethernet_size_and_fall_back_on_a_black_hole(net: Topology, directory: Path) -> None:
    bootstrap(directory, "pmtutest", [NodeSpec(name, net.address(name), PORT) for name in net.hosts])
    for name in net.hosts:
        path = directory / name / "node.toml"
        config = load_config(path)
        path.write_text(render_config(dataclasses.replace(
            config, node=dataclasses.replace(config.node, listen=Address(net.address(name), PORT)),
            timers=dataclasses.replace(config.timers, **TIMERS))))
    receiver = start_driver(net, directory, "b", "a")
    sender = start_driver(net, directory, "a", "b")
    assert sender.ask("limit", "limit") == 1200 - 30  # no probing before a packet went out full
    assert sender.ask("send 20000", "sent") < 5  # fills packets: the search starts
    assert receiver.ask("limit", "received") == 20000
    # datagram_limit counts the kind byte: packet size - 30 bytes of QUIC around the frame's data
    assert wait_limit(sender, 1472 - 30) == 1472 - 30
    time.sleep(1.0)  # the probe of the next size (4096) cannot leave a 1500-byte link: it stays at 1472
    assert sender.ask("limit", "limit") == 1472 - 30

    assert sender.ask("send 20000", "sent") < 5  # at the large size, before the black hole
    assert receiver.ask("limit", "received") == 20000

    rule = ["INPUT", "-p", "udp", "-m", "length", "--length", f"{BLACK_HOLE_ABOVE + 1}:65535", "-j", "DROP"]
    net.run("b", ["iptables", "-A", *rule])
    assert net.run("b", ["iptables", "-C", *rule], check=False).returncode == 0
    took = sender.ask("send 20000", "sent")
    assert isinstance(took, float), took  # delivered, not an error
    assert took < 20
    assert sender.ask("limit", "limit") == 1200 - 30
    assert receiver.ask("limit", "received") == 20000
    dropped = net.run("b", ["iptables", "-L", "INPUT", "-v", "-x", "-n"]).stdout
    assert any("length" in line and int(line.split()[0]) > 0 for line in dropped.splitlines()[2:]), dropped
