"""``quicmesh bench pubsub``: subjects on loopback, each node in its own process (docs/PUBSUB.md, "Performance").

Three runs, one after the other: unreliable fan-out from one publisher to 1 and to 3 subscriber nodes
(messages delivered per second over all subscribers, loss, one-way latency p50/p99 from the payload's
send time) and sequential requests by subject to one serving node (requests per second, round trip).
The publisher paces itself on its datagram backlog, as ``quicmesh bench datagram`` does.

A worker is ``python -m quicmesh.bench.pubsub JOB``: it says ``ready`` once connected (the publisher:
once every subscriber's interest has arrived), publishes after ``go`` (the publisher) or counts until
``stop`` (a subscriber), and reports ``done``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from quicmesh.bench.common import HEADER, Samples, emit, now, percentiles, run_on
from quicmesh.bench.runner import READY_TIMEOUT, _spawn_generic, _Worker, make_bench_mesh
from quicmesh.bench.worker import CONNECT_TIMEOUT, DATAGRAM_BURST, DATAGRAM_HIGH_WATER, QUIET, QUIET_MAX, Commands

SUBJECT = "bench.data"
REQUEST_SUBJECT = "bench.request"
DEFAULT_FANOUT_MSGS = 50_000
DEFAULT_REQUESTS = 5_000
RUNS = (("fanout", 1), ("fanout", 3), ("request", 1))


@dataclasses.dataclass
class PubSubBenchOptions:
    msgs: int | None = None  # per run; default 50,000 publishes (fan-out) or 5,000 requests
    size: int = 100
    loop: str = "auto"
    timeout: float = 120.0
    host: str = "127.0.0.1"

    def check(self) -> None:
        if not HEADER.size <= self.size <= 1000:
            raise ValueError(f"--size for pubsub must be between {HEADER.size} and 1000 bytes (one datagram)")


def run_pubsub_bench(options: PubSubBenchOptions) -> list[dict[str, Any]]:
    """Every run of :data:`RUNS`; each a result document."""
    options.check()
    results = []
    for mode, subscribers in RUNS:
        with tempfile.TemporaryDirectory(prefix="quicmesh-bench-pubsub-") as tmp:
            names = ["pub", *(f"sub{i + 1}" for i in range(subscribers))]
            configs = make_bench_mesh(Path(tmp) / "mesh", names, options.host)
            results.append(run_on("asyncio", lambda: _orchestrate(options, mode, configs)))
    return results


async def _orchestrate(options: PubSubBenchOptions, mode: str, configs: dict[str, Path]) -> dict[str, Any]:
    msgs = options.msgs or (DEFAULT_FANOUT_MSGS if mode == "fanout" else DEFAULT_REQUESTS)
    names = list(configs)
    subscribers = names[1:]
    workers: dict[str, _Worker] = {}
    stderr_dir = Path(tempfile.mkdtemp(prefix="quicmesh-bench-pubsub-log-"))
    try:
        for name in [*subscribers, "pub"]:
            job = {"name": name, "role": "pub" if name == "pub" else "sub", "mode": mode, "config": str(configs[name]),
                   "subscribers": subscribers, "msgs": msgs, "size": options.size, "timeout": options.timeout,
                   "loop": options.loop}
            stderr = open(stderr_dir / f"{name}.log", "w+")  # noqa: SIM115 - closed with the worker
            workers[name] = await _spawn_generic(name, ["-m", "quicmesh.bench.pubsub", json.dumps(job)], stderr)
        for worker in workers.values():
            await worker.expect("ready", READY_TIMEOUT)
        workers["pub"].say("go")
        sent = await workers["pub"].expect("done", options.timeout + 10)
        for name in subscribers:
            workers[name].say("stop")
        received = [await workers[name].expect("done", QUIET_MAX + 10) for name in subscribers]
        workers["pub"].say("stop")
    finally:
        for worker in workers.values():
            worker.say("stop")
            await worker.finish()
            worker.stderr.close()
    return _summary(mode, options, sent, received)


def _summary(mode: str, options: PubSubBenchOptions, sent: dict[str, Any], received: list[dict[str, Any]]) -> dict[str, Any]:
    elapsed = max(sent["elapsed"], 1e-9)
    if mode == "request":
        return {"mode": "request", "subscribers": 1, "size": options.size, "requests": sent["sent"],
                "per_s": sent["sent"] / elapsed, "latency_us": sent["latency"]}
    delivered = sum(r["received"] for r in received)
    expected = sent["sent"] * len(received)
    worst = max((r["latency"] for r in received if r["latency"]), key=lambda p: p["p99"], default=None)
    return {"mode": "fanout", "subscribers": len(received), "size": options.size, "published": sent["sent"],
            "delivered": delivered, "per_s": delivered / (max(r["last"] for r in received) - sent["started"])
            if delivered else 0.0, "loss_pct": 100.0 * (expected - delivered) / expected if expected else 0.0,
            "latency_us": worst}


def render(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        latency = result["latency_us"] or {}
        p50, p99 = latency.get("p50", 0.0), latency.get("p99", 0.0)
        if result["mode"] == "fanout":
            lines.append(f"  fan-out to {result['subscribers']} subscriber node(s): {result['per_s']:,.0f} msgs/s "
                         f"delivered ({result['delivered']:,} of {result['published']:,} x {result['subscribers']}, "
                         f"loss {result['loss_pct']:.2f}%), latency p50 {p50:,.0f} us p99 {p99:,.0f} us")
        else:
            lines.append(f"  request by subject: {result['per_s']:,.0f} requests/s (one at a time), "
                         f"round trip p50 {p50:,.0f} us p99 {p99:,.0f} us")
    return "\n".join(lines)


# --- a worker process ------------------------------------------------------------------------------
async def _worker(job: dict[str, Any]) -> int:
    from quicmesh.config import load_config
    from quicmesh.pubsub.feature import PubSub
    from quicmesh.runtime.node import Node

    logging.basicConfig(level=logging.WARNING, format=f"bench {job['name']}: %(name)s: %(message)s")
    commands = Commands()
    node = Node(load_config(job["config"]))
    samples = Samples()
    tally = {"received": 0, "last": 0.0}
    unpack, clock = HEADER.unpack_from, now

    def count(msg: Any) -> None:  # a handler subscription: no task switch per message
        t = clock()
        samples.add(t - unpack(msg.data)[1])
        tally["received"] += 1
        tally["last"] = t

    async with node:
        if job["role"] == "sub":
            if job["mode"] == "fanout":
                node.subscribe(SUBJECT, handler=count)
            else:
                node.serve_subject(REQUEST_SUBJECT, lambda msg: msg.data)
        await node.wait_connected(timeout=CONNECT_TIMEOUT)
        if job["role"] == "pub":
            feature = node.features.find(PubSub)
            assert feature is not None
            async with asyncio.timeout(CONNECT_TIMEOUT):
                while any(not feature.status()["interest"]["peers"].get(s) for s in job["subscribers"]):
                    await asyncio.sleep(0.02)
        emit("ready")
        if job["role"] == "sub":
            await commands.wait("stop", job["timeout"] + 30)
            quiet_until = now() + QUIET_MAX
            while now() < quiet_until and now() - (tally["last"] or 0.0) < QUIET:
                await asyncio.sleep(0.05)
            emit("done", received=tally["received"], last=tally["last"], latency=percentiles(samples.values))
            return 0
        if not await commands.wait("go", job["timeout"]):
            return 1
        result = await (_publish(node, job) if job["mode"] == "fanout" else _request(node, job))
        emit("done", **result)
        await commands.wait("stop", job["timeout"])
    return 0


async def _publish(node: Any, job: dict[str, Any]) -> dict[str, Any]:
    pad = b"\0" * (job["size"] - HEADER.size)
    subscribers, total = job["subscribers"], job["msgs"]
    publish, backlog, pack = node.publish, node.datagram_backlog, HEADER.pack
    started = now()
    deadline = started + job["timeout"]
    sent = 0
    while sent < total and now() < deadline:
        if max(backlog(s) for s in subscribers) >= DATAGRAM_HIGH_WATER:
            await asyncio.sleep(0)
            continue
        for _ in range(min(DATAGRAM_BURST, total - sent)):
            await publish(SUBJECT, pack(sent, now()) + pad)
            sent += 1
        await asyncio.sleep(0)
    return {"sent": sent, "started": started, "elapsed": now() - started}


async def _request(node: Any, job: dict[str, Any]) -> dict[str, Any]:
    pad = b"\0" * (job["size"] - HEADER.size)
    samples = Samples()
    started = now()
    deadline = started + job["timeout"]
    sent = 0
    while sent < job["msgs"] and now() < deadline:
        t = now()
        await node.request_subject(REQUEST_SUBJECT, HEADER.pack(sent, t) + pad, timeout=5.0)
        samples.add(now() - t)
        sent += 1
    return {"sent": sent, "started": started, "elapsed": now() - started, "latency": percentiles(samples.values)}


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    sys.exit(run_on(job["loop"], lambda: _worker(job)))
