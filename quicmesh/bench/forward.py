"""Benchmark of UDP service forwarding: `python -m quicmesh.bench.forward`.

Starts a UDP echo program and two `quicmesh run` daemons (alpha forwards a local port to beta's "echo"
service) on 127.0.0.1, each in its own process, then measures from this process, with the same
client code, against the echo program directly and through the mesh:

- latency: one datagram at a time, round trip, p50/p99 (and the difference: the latency forwarding adds);
- rate: round trips per second with a window of datagrams in flight (a lost one is given up after a
  timeout, so loss cannot stall the run), and the share that got no reply.

Nothing is sent anywhere but 127.0.0.1. Numbers depend on the machine; docs/FORWARDING.md records some.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quicmesh.ops.control import ControlClient
from quicmesh.ops.demo import LocalNode, free_udp_ports, make_local_mesh, start_node, stop_nodes, wait_healthy

_ECHO = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
while True:
    data, source = sock.recvfrom(65536)
    sock.sendto(data, source)
"""


def udp_receive_buffer_errors() -> int | None:
    """The kernel's count of UDP datagrams dropped for a full socket receive buffer (Linux), or None."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return int(dict(zip(lines[0], lines[1]))["RcvbufErrors"])
    except (OSError, KeyError, IndexError, ValueError):
        return None


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def latency(port: int, size: int, count: int, timeout: float = 1.0) -> tuple[list[float], int]:
    """Round-trip times (seconds) of ``count`` sequential datagrams; and how many got no reply."""
    samples, lost = [], 0
    payload = bytearray(os.urandom(size))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.connect(("127.0.0.1", port))
        sock.settimeout(timeout)
        for index in range(count):
            payload[:4] = index.to_bytes(4, "big")
            started = time.perf_counter()
            sock.send(payload)
            try:
                while True:
                    reply = sock.recv(65536)
                    if reply[:4] == payload[:4]:
                        break
            except TimeoutError:
                lost += 1
                continue
            samples.append(time.perf_counter() - started)
    return samples, lost


def rate(port: int, size: int, seconds: float, window: int, clients: int = 1) -> tuple[float, float]:
    """Echoed datagrams per second with ``window`` in flight per client, and the share never answered."""
    selector = selectors.DefaultSelector()
    socks = []
    payload = os.urandom(size)
    for _ in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
        selector.register(sock, selectors.EVENT_READ)
    sent = received = 0
    outstanding = {sock: 0 for sock in socks}
    last_reply = {sock: time.perf_counter() for sock in socks}
    end = time.perf_counter() + seconds
    try:
        while (now := time.perf_counter()) < end:
            for sock in socks:
                if outstanding[sock] and now - last_reply[sock] > 0.2:
                    outstanding[sock] = 0  # the rest were lost: do not wait for them
                while outstanding[sock] < window:
                    try:
                        sock.send(payload)
                    except BlockingIOError:
                        break
                    outstanding[sock] += 1
                    sent += 1
            for key, _ in selector.select(0.01):
                sock = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        sock.recv(65536)  # type: ignore[attr-defined]
                    except BlockingIOError:
                        break
                    received += 1
                    outstanding[sock] = max(0, outstanding[sock] - 1)  # type: ignore[index]
                    last_reply[sock] = time.perf_counter()  # type: ignore[index]
    finally:
        for sock in socks:
            selector.unregister(sock)
            sock.close()
    return received / seconds, (1 - received / sent) if sent else 0.0


async def _wait_forward_ready(node: LocalNode, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with await ControlClient.connect(node.socket) as client:
            status = await client.status()
        forwards = status.get("forwarding", {}).get("forwards", [])
        if forwards and forwards[0]["state"] == "ready":
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the forward did not become ready in time")


async def _drops(nodes: list[LocalNode]) -> str:
    """Where forwarded datagrams were dropped, from both daemons' status (to explain a "no reply" share)."""
    parts = []
    for node in nodes:
        async with await ControlClient.connect(node.socket) as client:
            status = await client.status()
        forwarding = status.get("forwarding", {})
        for entry in forwarding.get("forwards", []) + forwarding.get("services", []):
            drops = {k: v for k, v in entry["counters"].items()
                     if k in ("refused", "unavailable", "flows_refused", "oversize", "dropped", "denied") and v}
            parts.append(f"{node.name}: {drops or 'none'}")
        for peer in status.get("peers", []):
            parts.append(f"{node.name}->{peer['name']} datagrams_dropped: {peer['counters']['datagrams_dropped']}")
    return "drops seen by the daemons: " + "; ".join(parts)


def _setup(directory: Path, forward_port: int, echo_port: int) -> tuple[list[LocalNode], list[Any]]:
    nodes = make_local_mesh(directory, ["alpha", "beta"], mesh="bench")
    by_name = {node.name: node for node in nodes}
    with open(by_name["beta"].config, "a") as file:
        file.write(f'\n[[services]]\nname = "echo"\ntarget = "127.0.0.1:{echo_port}"\n')
    with open(by_name["alpha"].config, "a") as file:
        file.write(f'\n[[forwards]]\nlisten = "127.0.0.1:{forward_port}"\npeer = "beta"\nservice = "echo"\n')
    for node in nodes:  # benchmarks run quiet
        text = node.config.read_text().replace('level = "info"', 'level = "warning"')
        node.config.write_text(text)
    processes = [start_node(node) for node in nodes]
    return nodes, processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quicmesh.bench.forward", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--count", type=int, default=2000, help="round trips for the latency test")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each rate test")
    parser.add_argument("--window", type=int, default=32, help="datagrams in flight per client in the rate test")
    parser.add_argument("--clients", type=int, default=4, help="client sockets (flows) in the rate test")
    args = parser.parse_args(argv)

    echo = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    directory = Path(tempfile.mkdtemp(prefix="quicmesh-forward-bench-"))
    processes: list[Any] = []
    try:
        echo_port = int(echo.stdout.readline())  # type: ignore[union-attr]
        (forward_port,) = free_udp_ports(1)
        nodes, processes = _setup(directory, forward_port, echo_port)

        async def ready() -> None:
            deadline = time.monotonic() + 20
            await asyncio.gather(*(wait_healthy(n, deadline, p) for n, p in zip(nodes, processes)))
            await _wait_forward_ready(nodes[0])

        asyncio.run(ready())
        print(f"UDP echo through quicmesh forwarding, 127.0.0.1, {os.cpu_count()} CPUs, payload {args.size} B")
        print(f"{'path':<10} {'p50 RTT':>10} {'p99 RTT':>10} {'lost':>6} {'echoed/s':>10} {'no reply':>9}")
        results = {}
        kernel_drops: dict[str, int] = {}
        for path, port in (("direct", echo_port), ("forwarded", forward_port)):
            latency(port, args.size, 200)  # warm up
            samples, lost = latency(port, args.size, args.count)
            before = udp_receive_buffer_errors()
            per_second, loss = rate(port, args.size, args.seconds, args.window, args.clients)
            after = udp_receive_buffer_errors()
            if before is not None and after is not None:
                kernel_drops[path] = after - before
            p50, p99 = percentile(samples, 50), percentile(samples, 99)
            results[path] = (p50, p99)
            print(f"{path:<10} {p50 * 1e6:>8.0f}us {p99 * 1e6:>8.0f}us {lost:>6} {per_second:>10.0f} {loss:>8.1%}")
        added50 = results["forwarded"][0] - results["direct"][0]
        added99 = results["forwarded"][1] - results["direct"][1]
        print(f"added by forwarding: p50 {added50 * 1e6:.0f}us, p99 {added99 * 1e6:.0f}us (round trip: both ways)")
        print(f"rate test: {args.clients} clients x {args.window} in flight for {args.seconds:g}s each")
        print(asyncio.run(_drops(nodes)))
        if kernel_drops:
            print("UDP datagrams the kernel dropped (full socket receive buffers, whole machine) during the "
                  "rate tests: " + ", ".join(f"{path} {count}" for path, count in kernel_drops.items()))
        return 0
    finally:
        stop_nodes(processes)
        echo.kill()
        echo.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
