"""Relaying (issue 14) between real hosts: `quicmesh run` processes in network namespaces, a-c cut by iptables.

Hosts a, b and c share a bridge; a test blocks a-c (both directions, at both ends) while a-b and b-c stay
open, so a and c can only talk through b. Every node is a real daemon with its control socket; the test
drives and observes them through it (sends and their acknowledgements, listeners, status documents).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns.topology import Topology
from pki.bootstrap import NodeSpec, bootstrap
from quicmesh.config import Address, ForwardConfig, ServiceConfig, load_config, render_config
from quicmesh.ops.control import ControlClient, NodeUnreachableError, fetch_status

HERE = Path(__file__).resolve().parent
PORT = 4433
#: Short timers keep the tests fast: a dead path is noticed after 1.5 s, a failed dial retried within 1 s.
TIMERS = {"keepalive": 0.5, "dead_after": 1.5, "backoff_min": 0.2, "backoff_max": 1.0, "handshake_timeout": 1.5}
#: Relaying needs outer DATAGRAM frames of at least 1,240 bytes (docs/RELAY.md); 1452 fits a 1500-byte MTU.
MAX_DATAGRAM_SIZE = 1452
WINDOW = 64  # acknowledgements awaited at once, as `quicmesh send --lines` does
FORWARD_SERVICE, FORWARD_PORT = Address("127.0.0.1", 7007), 7008

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, source = s.recvfrom(2048)
    s.sendto(b"echo:" + data, source)
"""
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
answers = set()
for attempt in range(40):  # the forward's flow may take a moment to open; bounded
    s.sendto(b"fwd-%d" % attempt, ("127.0.0.1", int(sys.argv[1])))
    try:
        while True:
            answers.add(s.recvfrom(2048)[0].decode())
    except TimeoutError:
        pass
    if len(answers) >= 5:
        break
print(" ".join(sorted(answers)))
"""


# --- the mesh ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Mesh:
    """Daemons of a bootstrapped mesh, one per host of ``net``, each listening on its host's address."""

    net: Topology
    directory: Path
    processes: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    def config(self, name: str) -> Path:
        return self.directory / name / "node.toml"

    def socket(self, name: str) -> Path:
        return load_config(self.config(name)).control.socket

    def log(self, name: str) -> str:
        return (self.directory / name / "node.log").read_text(errors="replace")

    def start(self, name: str, program: list[str] | None = None) -> None:
        """``quicmesh run`` on the host ``name`` (``program``: another driver taking the same arguments)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("QUICMESH_CONTROL_SOCKET", "QUICMESH_SOCKET", "QUICMESH_CONFIG", "NOTIFY_SOCKET")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent.parent), env.get("PYTHONPATH")]))
        with open(self.directory / name / "node.log", "ab") as log:
            self.processes[name] = self.net.popen(
                name, [*(program or [sys.executable, "-m", "quicmesh"]), "run", "-c", str(self.config(name))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")

    async def status(self, name: str) -> dict[str, Any]:
        return await fetch_status(self.socket(name))

    async def path(self, name: str, peer: str) -> str | None:
        """``direct``, ``via RELAY``, or None while ``peer`` is not connected (as ``name`` sees it)."""
        try:
            status = await self.status(name)
        except NodeUnreachableError:
            return None
        entry = next(p for p in status["peers"] if p["name"] == peer)
        return entry["path"] if entry["state"] == "connected" else None

    async def wait_path(self, name: str, peer: str, wanted: str, timeout: float) -> float:
        """Poll until ``name`` reaches ``peer`` by ``wanted``; the monotonic time it was first seen."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            self.check_running()
            seen = await self.path(name, peer)
            if seen == wanted:
                return time.monotonic()
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} -> {peer}: path {seen!r}, not {wanted!r} within {timeout:g}s; "
                             f"{name}'s log:\n{self.log(name)[-3000:]}")


def make_mesh(directory: Path, net: Topology, **tweaks: dict[str, Any]) -> Mesh:
    """Bootstrap one node per host (real CA and certs), short timers, 1452-byte datagrams; ``tweaks``: per
    node, Config fields to replace (e.g. ``b={"relay": RelaySection(serve=False)}``)."""
    bootstrap(directory, "relaytest", [NodeSpec(name, net.address(name), PORT) for name in net.hosts])
    for name in net.hosts:
        path = directory / name / "node.toml"
        config = load_config(path)
        config = dataclasses.replace(
            config,
            node=dataclasses.replace(config.node, listen=Address(net.address(name), PORT)),
            timers=dataclasses.replace(config.timers, **TIMERS),
            limits=dataclasses.replace(config.limits, max_datagram_size=MAX_DATAGRAM_SIZE),
            **tweaks.get(name, {}))
        path.write_text(render_config(config))
    return Mesh(net, directory)


@pytest.fixture
def net() -> Iterator[Topology]:
    with Topology(["a", "b", "c"]) as topology:
        yield topology


@pytest.fixture
def directory() -> Iterator[Path]:
    # Not tmp_path: control socket paths must stay short (Unix sockets take at most ~107 bytes).
    with tempfile.TemporaryDirectory(prefix="qmrelay-") as name:
        yield Path(name)


# --- traffic ---------------------------------------------------------------------------------------------
class Tally:
    """What the receiving node handed its listener: each message id with the time it arrived."""

    def __init__(self) -> None:
        self.ids: Counter[int] = Counter()
        self.arrivals: list[tuple[float, int]] = []
        self.other: list[dict[str, Any]] = []  # datagrams, and anything that is not one of our messages
        self.listener_drops = 0

    def lost(self, acknowledged: set[int]) -> set[int]:
        return acknowledged - set(self.ids)

    def duplicated(self) -> dict[int, int]:
        return {i: n for i, n in self.ids.items() if n > 1}

    def first_after(self, moment: float) -> float | None:
        return next((t for t, _ in self.arrivals if t >= moment), None)


MESSAGE = re.compile(rb"msg-(\d{6})")


async def listen(socket: Path, tally: Tally) -> None:
    async with await ControlClient.connect(socket) as client:
        await client.listen(["message", "datagram"])
        async for event in client.events():
            if event.get("event") == "dropped":
                tally.listener_drops += event["count"]
                continue
            data = base64.b64decode(event.get("data", ""))
            match = MESSAGE.fullmatch(data)
            if event.get("kind") == "message" and match:
                tally.ids[int(match.group(1))] += 1
                tally.arrivals.append((time.monotonic(), int(match.group(1))))
            else:
                tally.other.append({**event, "data": data})


async def start_listening(socket: Path) -> tuple[Tally, asyncio.Task[None]]:
    """A listener on a node's control socket (cancel the task to stop it), once it has subscribed."""
    tally = Tally()
    task = asyncio.create_task(listen(socket, tally))
    await asyncio.sleep(0.3)
    return tally, task


class Sender:
    """Sends ``msg-NNNNNN`` messages a -> c through a's control socket, WINDOW awaiting their ack at once."""

    def __init__(self, client: ControlClient, peer: str) -> None:
        self.client = client
        self.peer = peer
        self.acknowledged: set[int] = set()
        self.sent = 0

    async def send(self, count: int, timeout: float) -> None:
        """Send ``count`` more; returns once every one is acknowledged (AssertionError after ``timeout``)."""
        window = asyncio.Semaphore(WINDOW)
        deadline = time.monotonic() + timeout

        async def one(number: int) -> None:
            try:
                await asyncio.wait_for(self.client.send(self.peer, b"msg-%06d" % number),
                                       max(0.1, deadline - time.monotonic()))
                self.acknowledged.add(number)
            finally:
                window.release()

        tasks = []
        for number in range(self.sent, self.sent + count):
            await window.acquire()
            tasks.append(asyncio.create_task(one(number)))
        self.sent += count
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} of {count} not acknowledged in {timeout:g}s: {failures[0]!r}"


async def wait_all_received(tally: Tally, acknowledged: set[int], timeout: float = 10.0) -> None:
    """Every acknowledged message was handed to the node's listener before its ack; the listener's copy
    may trail by a moment (it goes through the control socket)."""
    deadline = time.monotonic() + timeout
    while tally.lost(acknowledged) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def assert_exactly_once(tally: Tally, acknowledged: set[int], expected: int) -> None:
    assert tally.listener_drops == 0, "the test's listener fell behind (control socket dropped events)"
    assert len(acknowledged) == expected
    lost, duplicated = tally.lost(acknowledged), tally.duplicated()
    print(f"\n{expected} acknowledged, {len(lost)} lost, {len(duplicated)} duplicated")
    assert not lost, f"{len(lost)} acknowledged messages never arrived, e.g. {sorted(lost)[:10]}"
    assert not duplicated, f"{len(duplicated)} messages arrived more than once, e.g. {list(duplicated.items())[:10]}"
    assert set(tally.ids) <= set(range(expected)), "messages that were never sent arrived"


# --- 1. a and c only through b ---------------------------------------------------------------------------------
def test_blocked_pair_talks_through_the_relay(net: Topology, directory: Path) -> None:
    mesh = make_mesh(directory, net, c={"services": (ServiceConfig("echo", FORWARD_SERVICE),)},
                     a={"forwards": (ForwardConfig(Address("127.0.0.1", FORWARD_PORT), "c", "echo"),)})
    net.block("a", "c")
    for name in "abc":
        mesh.start(name)

    async def scenario() -> None:
        await mesh.wait_path("a", "c", "via b", timeout=30)
        await mesh.wait_path("c", "a", "via b", timeout=10)
        assert await mesh.path("a", "b") == "direct" and await mesh.path("c", "b") == "direct"
        tally, listening = await start_listening(mesh.socket("c"))
        async with await ControlClient.connect(mesh.socket("a")) as client:
            sender = Sender(client, "c")
            started = time.monotonic()
            await sender.send(10_000, timeout=120)
            print(f"\n10,000 acknowledged messages a -> c via b in {time.monotonic() - started:.1f}s")
            await wait_all_received(tally, sender.acknowledged)
            assert_exactly_once(tally, sender.acknowledged, 10_000)

            for attempt in range(20):  # datagrams are unreliable: a few tries, bounded
                await client.send("c", b"datagram-%d" % attempt, datagram=True)
                await asyncio.sleep(0.05)
                if any(e.get("kind") == "datagram" for e in tally.other):
                    break
            datagrams = [e["data"] for e in tally.other if e.get("kind") == "datagram"]
            assert datagrams and all(re.fullmatch(rb"datagram-\d+", d) for d in datagrams)
            assert await client.request("c", b"question", timeout=5) == b"question"  # c's daemon echoes
            assert await mesh.path("a", "c") == "via b"
        listening.cancel()
        relay = (await mesh.status("b"))["relay"]
        # each message's 10 bytes crossed b (inside encrypted packets, many messages per packet)
        assert relay["circuits_open"] >= 1 and relay["counters"]["bytes_relayed"] > 10 * 10_000, relay

    asyncio.run(scenario())

    echo = net.popen("c", [sys.executable, "-u", "-c", UDP_ECHO, str(FORWARD_SERVICE.port)], stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
    answers = net.run("a", [sys.executable, "-c", UDP_CLIENT, str(FORWARD_PORT)], timeout=40).stdout.split()
    assert len(answers) >= 5 and all(re.fullmatch(r"echo:fwd-\d+", a) for a in answers), answers
    mesh.check_running()


# --- 2. failover: direct -> via b -> direct ---------------------------------------------------------------------------
def test_failover_to_the_relay_and_back_loses_and_duplicates_nothing(net: Topology, directory: Path) -> None:
    mesh = make_mesh(directory, net)
    for name in "abc":
        mesh.start(name)

    async def scenario() -> None:
        await mesh.wait_path("a", "c", "direct", timeout=30)
        await mesh.wait_path("c", "a", "direct", timeout=10)
        tally, listening = await start_listening(mesh.socket("c"))
        async with await ControlClient.connect(mesh.socket("a")) as client:
            sender = Sender(client, "c")
            await sender.send(2000, timeout=60)

            streaming = asyncio.create_task(sender.send(3000, timeout=60))
            await asyncio.sleep(0.2)  # mid-stream
            blocked = time.monotonic()
            net.block("a", "c")
            relayed = await mesh.wait_path("a", "c", "via b", timeout=15)
            await streaming
            first_relayed = tally.first_after(relayed)
            assert first_relayed is not None, "no message arrived once the relayed path was up"
            switch = first_relayed - blocked

            streaming = asyncio.create_task(sender.send(3000, timeout=60))
            await asyncio.sleep(0.2)
            healed = time.monotonic()
            net.heal("a", "c")
            direct = await mesh.wait_path("a", "c", "direct", timeout=15)
            await streaming
            await sender.send(1000, timeout=30)
            back = direct - healed
            await wait_all_received(tally, sender.acknowledged)
            print(f"\nswitch to the relay: {switch:.2f}s (block -> first message delivered via b); "
                  f"back to direct: {back:.2f}s (heal -> path direct)")
            assert_exactly_once(tally, sender.acknowledged, 9000)
            assert switch <= 5.0, f"traffic moved to the relay {switch:.2f}s after the block (target <= 5 s)"
        listening.cancel()

    asyncio.run(scenario())
    mesh.check_running()


# --- 3. the relay sees only ciphertext ----------------------------------------------------------------------------------
def test_relay_never_sees_the_plaintext(net: Topology, directory: Path) -> None:
    mesh = make_mesh(directory, net)
    net.block("a", "c")
    for name in "abc":
        mesh.start(name)
    canary = b"PLAINTEXT-CANARY-" + secrets.token_hex(8).encode()

    async def reach() -> None:
        await mesh.wait_path("a", "c", "via b", timeout=30)

    asyncio.run(reach())
    stop = directory / "capture.stop"
    out = directory / "capture.json"
    capture = subprocess.Popen(
        ["ip", "netns", "exec", net.switch_namespace, sys.executable, "-u", str(HERE / "capture.py"), str(out),
         canary.hex(), str(stop), "60"], stdout=subprocess.PIPE)
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == b"ready"
        # The control: the same canary in a plain UDP datagram a -> b must be seen (port 9: nobody listens).
        net.run("a", [sys.executable, "-c", "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                      ".sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 9))", canary.hex(), net.address("b")])

        async def send_canaries() -> None:
            async with await ControlClient.connect(mesh.socket("a")) as client:
                for number in range(200):
                    await client.send("c", canary + b" %d " % number + canary)
                for number in range(50):
                    await client.send("c", canary * 20, datagram=True)
                assert await client.request("c", canary, timeout=5) == canary

        asyncio.run(send_canaries())
        time.sleep(0.3)
        stop.touch()
        capture.wait(10)
    finally:
        if capture.poll() is None:
            capture.kill()
    seen = json.loads(out.read_text())
    a, b, c = (net.address(h) for h in "abc")
    hits = seen["needle_hits"]
    assert {"pair": f"{a}>{b}", "port": 9} in hits, "the capture missed the plain control datagram"
    leaked = [h for h in hits if h["port"] != 9]
    assert not leaked, f"the canary crossed the bridge in clear: {leaked[:5]}"
    pairs = seen["udp_by_pair"]
    assert pairs.get(f"{a}>{b}", 0) >= 200 and pairs.get(f"{b}>{c}", 0) >= 200, pairs  # relayed traffic seen
    assert not pairs.get(f"{a}>{c}") and not pairs.get(f"{c}>{a}"), "a and c talked directly"
    mesh.check_running()


# --- 4. a relay that flips bits --------------------------------------------------------------------------------------
def test_tampering_relay_gets_no_connection_and_delivers_nothing(net: Topology, directory: Path) -> None:
    mesh = make_mesh(directory, net)
    net.block("a", "c")
    mesh.start("a")
    mesh.start("b", [sys.executable, str(HERE / "tampering_relay.py")])
    mesh.start("c")

    async def scenario() -> None:
        await mesh.wait_path("a", "b", "direct", timeout=30)
        await mesh.wait_path("c", "b", "direct", timeout=10)
        tally, listening = await start_listening(mesh.socket("c"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # circuits are opened and retried meanwhile; none may carry a connection
            assert await mesh.path("a", "c") is None and await mesh.path("c", "a") is None
            await asyncio.sleep(0.1)
        relay = (await mesh.status("b"))["relay"]
        assert relay["counters"]["circuits_opened"] >= 1 and relay["counters"]["packets_relayed"] > 0, relay
        async with await ControlClient.connect(mesh.socket("a")) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.send("c", b"msg-000000"), 3)
        await asyncio.sleep(0.5)
        listening.cancel()
        assert not tally.ids and not tally.other, "something arrived at c through the tampering relay"

    asyncio.run(scenario())
    assert "tampered with" in mesh.log("b")
    for end, other in (("a", "c"), ("c", "a")):  # each end logs why each relayed connection ended
        assert f"reaching {other} through relay b" in mesh.log(end)
        reasons = set(re.findall(rf'closing connection .*peer={other} address=via-b:\d+ reason="([^"]+)"',
                                 mesh.log(end)))
        print(f"\n{end}: relayed connections to {other} closed: {reasons}")
        assert reasons, f"{end} logged no reason for its failed relayed connections to {other}"
    mesh.check_running()


def test_relay_that_starts_tampering_delivers_nothing_garbled(net: Topology, directory: Path) -> None:
    """a and c connect through an honest-looking b, which then starts flipping bits: nothing arrives at c,
    nothing is acknowledged, and the inner connection ends with a logged reason."""
    mesh = make_mesh(directory, net)
    net.block("a", "c")
    switch = directory / "tamper.now"
    mesh.start("a")
    mesh.start("b", ["env", f"TAMPER_WHEN_EXISTS={switch}", sys.executable, str(HERE / "tampering_relay.py")])
    mesh.start("c")

    async def scenario() -> None:
        await mesh.wait_path("a", "c", "via b", timeout=30)
        tally, listening = await start_listening(mesh.socket("c"))
        async with await ControlClient.connect(mesh.socket("a")) as client:
            sender = Sender(client, "c")
            await sender.send(100, timeout=30)
            await wait_all_received(tally, sender.acknowledged)
            switch.touch()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.send("c", b"msg-000100"), 3)
        deadline = time.monotonic() + 10
        while await mesh.path("a", "c") == "via b" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await mesh.path("a", "c") != "via b", "the tampered connection stayed up"
        await asyncio.sleep(0.5)
        listening.cancel()
        assert_exactly_once(tally, sender.acknowledged, 100)
        assert not tally.other, f"something else arrived at c: {tally.other[:3]}"

    asyncio.run(scenario())
    assert "tampered with" in mesh.log("b")
    reasons = set(re.findall(r'closing connection .*peer=c address=via-b:\d+ reason="([^"]+)"', mesh.log("a")))
    print(f"\na: the tampered connection to c closed: {reasons}")
    assert reasons
    mesh.check_running()


# --- 5. policy: the relay refuses -------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, reason", [
    ({"serve": False}, "b does not relay ([relay] serve = false)"),
    ({"allow": ("c",)}, "b does not relay for a (not in [relay] allow)"),
])
def test_refusing_relay_shows_its_reason_at_a(net: Topology, directory: Path, policy: dict[str, Any],
                                               reason: str) -> None:
    from quicmesh.config.model import RelaySection

    mesh = make_mesh(directory, net, b={"relay": RelaySection(**policy)})
    net.block("a", "c")
    for name in "abc":
        mesh.start(name)

    async def scenario() -> str:
        await mesh.wait_path("a", "b", "direct", timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            errors = (await mesh.status("a"))["relay"]["errors"]
            if "c" in errors:
                return errors["c"]
            await asyncio.sleep(0.1)
        raise AssertionError(f"a's status never gave a reason for c; a's log:\n{mesh.log('a')[-3000:]}")

    shown = asyncio.run(scenario())
    print(f"\na's status: relay to c: {shown}")
    assert reason in shown
    assert reason in mesh.log("a")  # logged too
    assert asyncio.run(mesh.path("a", "c")) is None
    mesh.check_running()
