"""`quicmesh demo`: a throwaway mesh on 127.0.0.1 that shows, in a few seconds, what quicmesh does.

It uses only what a user would: the PKI library (as `quicmesh-pki bootstrap` does), one `quicmesh run`
process per node, and each node's control socket (as `quicmesh status/send/listen` do). The helpers
that build and run such a local mesh are also what the integration tests use.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from quicmesh.errors import QuicmeshError
from quicmesh.ops.control import SOCKET_ENVS, ControlClient, NodeUnreachableError, fetch_status
from quicmesh.ops.status import exit_code, problem_summary, render

NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
START_TIMEOUT = 20.0   # from starting the processes until every node has all its peers
ARRIVAL_TIMEOUT = 5.0  # for something sent to show up at its receiver
STOP_TIMEOUT = 5.0     # for a node to exit after SIGTERM


class DemoError(QuicmeshError):
    """A step of the demo did not do what it should."""


@dataclass(frozen=True)
class LocalNode:
    """One node of a mesh made by ``make_local_mesh``: where its files are and how to reach it."""

    name: str
    config: Path  # its node.toml
    socket: Path  # its control socket
    port: int     # its UDP port on 127.0.0.1

    @property
    def log(self) -> Path:
        return self.config.with_name("node.log")


def free_udp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """UDP ports on ``host`` that are free right now (all held open together, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def make_local_mesh(directory: Path, names: Iterable[str] = NAMES[:3], mesh: str = "demo") -> list[LocalNode]:
    """Bootstrap a mesh into ``directory`` (a CA, a folder per node) whose nodes listen on 127.0.0.1 only."""
    # Imported here, not above: `quicmesh bench` imports this module, and its client-side use must stay light.
    from pki.bootstrap import NodeSpec, bootstrap

    from quicmesh.config import Address, load_config, render_config

    names = list(names)
    specs = [NodeSpec(name, "127.0.0.1", port) for name, port in zip(names, free_udp_ports(len(names)))]
    bootstrap(directory, mesh, specs)
    nodes = []
    for spec in specs:
        path = directory / spec.name / "node.toml"
        config = load_config(path)
        # bootstrap listens on every interface; a demo (or a test) stays on loopback.
        loopback = dataclasses.replace(config.node, listen=Address("127.0.0.1", spec.port))
        path.write_text(render_config(dataclasses.replace(config, node=loopback)))
        nodes.append(LocalNode(spec.name, path, config.control.socket, spec.port))
    return nodes


def start_node(node: LocalNode, *args: str) -> subprocess.Popen[bytes]:
    """Start `quicmesh run` for ``node`` in its own session (a Ctrl-C meant for us does not reach it),
    logging to ``node.log``."""
    # Each node its own socket and config: no inherited QUICMESH_SOCKET, QUICMESH_CONTROL_SOCKET or QUICMESH_CONFIG.
    env = {k: v for k, v in os.environ.items() if k not in (*SOCKET_ENVS, "QUICMESH_CONFIG", "NOTIFY_SOCKET")}
    with open(node.log, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "quicmesh", "run", "-c", str(node.config), *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)


def stop_nodes(processes: Iterable[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM every process, wait up to ``timeout`` for all, SIGKILL the rest; their exit statuses."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return [process.returncode for process in processes]


async def wait_healthy(node: LocalNode, deadline: float, process: subprocess.Popen[bytes] | None = None
                       ) -> dict[str, Any]:
    """Poll the node's status until all its peers are connected; DemoError at the deadline."""
    status: dict[str, Any] | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise DemoError(f"{node.name} exited with status {process.returncode}; its log:\n{tail(node.log)}")
        try:
            status = await fetch_status(node.socket)
        except NodeUnreachableError:
            status = None
        if exit_code(status) == 0:
            return status
        if time.monotonic() > deadline:
            why = problem_summary(status) if status else f"{node.name}: its control socket never answered"
            raise DemoError(f"the mesh did not form in time: {why}")
        await asyncio.sleep(0.05)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"    (no log: {exc.strerror})"


# --- the show ---------------------------------------------------------------------------------------
class _Demo:
    def __init__(self, workdir: Path, count: int, out: TextIO) -> None:
        self.workdir = workdir
        self.names = list(NAMES[:count])
        self.out = out
        self.started = time.monotonic()
        self.nodes: list[LocalNode] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: dict[str, ControlClient] = {}

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self.say(f"\n{text}")

    async def run(self) -> None:
        self.say(f"quicmesh demo: {len(self.names)} nodes on 127.0.0.1, each its own process, in {self.workdir}")
        self._pki()
        try:
            await self._start()
            await self._traffic()
            await self._status()
        finally:
            for client in self.clients.values():
                await client.close()

    def _pki(self) -> None:
        from quicmesh.protocol.identity import fingerprint, load_certificates

        self.step("1. PKI: a throwaway CA for mesh 'demo' and a certificate per node (quicmesh-pki bootstrap)")
        began = time.monotonic()
        self.nodes = make_local_mesh(self.workdir, self.names)
        width = max(map(len, self.names))
        for node in self.nodes:
            fp = fingerprint(load_certificates(node.config.with_name("node.crt"))[0])
            self.say(f"   {node.name:<{width}}  udp 127.0.0.1:{node.port:<5}  cert {fp[:23]}...")
        self.say(f"   done in {time.monotonic() - began:.1f}s; CA in {self.workdir / 'ca'}")

    async def _start(self) -> None:
        self.step("2. Starting the nodes:  quicmesh run -c <node>/node.toml")
        began = time.monotonic()
        for node in self.nodes:
            self.processes[node.name] = start_node(node)
        pids = ", ".join(f"{name} (pid {p.pid})" for name, p in self.processes.items())
        self.say(textwrap.fill(pids, width=100, initial_indent="   ", subsequent_indent="   "))
        self.step("3. The mesh forms: every node dials every other; both ends check the peer's certificate")
        deadline = began + START_TIMEOUT

        async def report(node: LocalNode) -> None:
            status = await wait_healthy(node, deadline, self.processes[node.name])
            total = status["peers_total"]
            self.say(f"   {node.name}: {total}/{total} peers connected after {time.monotonic() - began:.1f}s")

        await asyncio.gather(*(report(node) for node in self.nodes))
        for node in self.nodes:
            self.clients[node.name] = client = await ControlClient.connect(node.socket)
            await client.listen(["datagram", "message"])

    async def _arrivals(self, receiver: str, expected: int, timeout: float = ARRIVAL_TIMEOUT) -> list[dict[str, Any]]:
        """What ``receiver`` gets until ``expected`` items arrived or ``timeout`` passed."""
        got: list[dict[str, Any]] = []
        events = self.clients[receiver].events()
        try:
            async with asyncio.timeout(timeout):
                while len(got) < expected:
                    event = await anext(events)
                    if event["event"] == "received":
                        got.append(event)
        except TimeoutError:
            pass
        return got

    def _route(self, hop: int) -> tuple[str, str]:
        return self.names[hop % len(self.names)], self.names[(hop + 1) % len(self.names)]

    async def _traffic(self) -> None:
        self.step("4. Traffic, sent and received through the nodes' control sockets (quicmesh send / listen)")
        width = max(map(len, self.names))

        def line(sender: str, receiver: str, what: str, result: str) -> None:
            self.say(f"   {sender:>{width}} -> {receiver:<{width}}  {what:<34} {result}")

        sender, receiver = self._route(0)
        text = f"hello {receiver}, from {sender}"
        await self.clients[sender].send(receiver, text.encode(), datagram=True)
        got = await self._arrivals(receiver, 1)
        if not got or base64.b64decode(got[0]["data"]).decode() != text:
            raise DemoError(f"the datagram from {sender} did not arrive at {receiver}")
        line(sender, receiver, f"datagram '{text}'", f"arrived at {receiver} (unreliable, no ack)")

        sender, receiver = self._route(1)
        text = "order #1"
        began = time.monotonic()
        await self.clients[sender].send(receiver, text.encode())
        acked = time.monotonic() - began
        got = await self._arrivals(receiver, 1)
        if not got or base64.b64decode(got[0]["data"]).decode() != text:
            raise DemoError(f"the message from {sender} did not arrive at {receiver}")
        line(sender, receiver, f"message '{text}'", f"acknowledged in {acked * 1000:.1f}ms, arrived at {receiver}")

        sender, receiver = self._route(2)
        count = 100
        await asyncio.gather(*(self.clients[sender].send(receiver, f"message {i}".encode()) for i in range(count)))
        got = await self._arrivals(receiver, count)
        copies = Counter(base64.b64decode(item["data"]) for item in got)
        if len(copies) != count or max(copies.values()) != 1:
            raise DemoError(f"{receiver} got {len(copies)} different messages of {count} "
                            f"({len(got)} deliveries): messages must arrive exactly once")
        line(sender, receiver, f"{count} messages at once", f"all {count} arrived, each exactly once")

        sender, receiver = self._route(3)
        for i in range(count):
            await self.clients[sender].send(receiver, f"datagram {i}".encode(), datagram=True)
        got = await self._arrivals(receiver, count, timeout=1.0)
        line(sender, receiver, f"{count} datagrams", f"{len(got)}/{count} arrived (datagrams may be dropped)")

        sender, receiver = self._route(4)
        await self._request(sender, receiver, line)

    async def _request(self, sender: str, receiver: str, line: Any) -> None:
        """A request answered by an application attached to the receiver's control socket."""
        app = self.clients[receiver]
        await app.call("serve")

        async def answer() -> None:
            async for event in app.events():
                if event["event"] == "request":
                    reply = b"pong from " + receiver.encode()
                    await app.call("reply", request=event["request"], data=base64.b64encode(reply).decode())
                    return

        answering = asyncio.create_task(answer())
        began = time.monotonic()
        reply = await self.clients[sender].request(receiver, b"ping", timeout=ARRIVAL_TIMEOUT)
        await answering
        took = (time.monotonic() - began) * 1000
        line(sender, receiver, "request 'ping'", f"reply '{reply.decode()}' in {took:.1f}ms, from an application "
                                                 f"on {receiver}'s control socket")

    async def _status(self) -> None:
        self.step("5. Each node's view (quicmesh status):")
        for node in self.nodes:
            status = await self.clients[node.name].status()
            self.say("")
            self.say("\n".join("   " + row for row in render(status).splitlines()))

    def stop(self) -> None:
        self.step("6. Stopping: SIGTERM to every node (a graceful goodbye to each peer)")
        began = time.monotonic()
        codes = stop_nodes(self.processes.values())
        if any(codes):
            bad = ", ".join(f"{name} exited {code}" for name, code in zip(self.processes, codes) if code)
            raise DemoError(f"not every node stopped cleanly: {bad}")
        self.say(f"   all {len(codes)} nodes exited cleanly (status 0) in {time.monotonic() - began:.1f}s")

    def keep(self) -> None:
        quicmesh = "quicmesh" if shutil.which("quicmesh") else f"{shlex.quote(sys.executable)} -m quicmesh"
        first, second = self.nodes[0], self.nodes[1]
        pids = " ".join(str(p.pid) for p in self.processes.values())
        self.step("The nodes keep running (--keep). Talk to them:")
        self.say(f"   {quicmesh} status --socket {first.socket}")
        self.say(f"   {quicmesh} listen --socket {second.socket} &")
        self.say(f"   {quicmesh} send --socket {first.socket} {second.name} 'hello'")
        self.say(f"   {quicmesh} request --socket {first.socket} {second.name} 'ping'")
        self.say(f"Their logs: {self.workdir}/<node>/node.log")
        self.say(f"Stop them and remove the files:  kill {pids} && rm -rf {self.workdir}")


def run_demo(nodes: int = 3, keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 on success. The nodes are stopped and the files removed in every case but --keep."""
    workdir = Path(tempfile.mkdtemp(prefix="quicmesh-demo-"))
    demo = _Demo(workdir, nodes, out)
    kept = False
    try:
        asyncio.run(demo.run())
        if keep:
            demo.keep()
            kept = True
        else:
            demo.stop()
            demo.say(f"\nDemo OK in {time.monotonic() - demo.started:.1f}s; its files are removed.")
        return 0
    except (QuicmeshError, OSError) as exc:
        print(f"quicmesh demo: FAILED: {exc}", file=sys.stderr)
        for node in demo.nodes:
            print(f"  last lines of {node.name}'s log:\n{tail(node.log, 8)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nquicmesh demo: interrupted; stopping the nodes", file=sys.stderr)
        raise
    finally:
        if not kept:
            stop_nodes(demo.processes.values(), timeout=2.0)
            shutil.rmtree(workdir, ignore_errors=True)
