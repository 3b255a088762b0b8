"""One bench run: a receiver and N senders, each in its own process, on a throwaway loopback mesh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from quicmesh.ops.demo import free_udp_ports
from quicmesh.bench.common import MIN_SIZE, resolve_loop

READY_TIMEOUT = 45.0
#: Outer connections must carry a relayed 1,200-byte QUIC packet plus the relay header (docs/RELAY.md).
RELAY_DATAGRAM_SIZE = 1452
RELAY = "relay"
EXIT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 120.0


@dataclass
class BenchOptions:
    mode: str = "datagram"
    impl: str = "quicmesh"
    msgs: int | None = None
    duration: float | None = None
    size: int = 100
    rate: float | None = None
    peers: int = 1
    loop: str = "auto"
    timeout: float = DEFAULT_TIMEOUT
    host: str = "127.0.0.1"
    durable: str | None = None  # message mode: durable messages with [storage] sync = "normal" or "full"
    #: through a third node: the sender and the receiver have each other's address wrong, so they reach each
    #: other only through a relay node (quicmesh/relay), which every one of them reaches directly
    relayed: bool = False
    max_datagram_size: int | None = None  # limits.max_datagram_size of every node (None: the default)
    #: how the quicmesh receiver takes what arrives: "handler" (set_receive_handler and a plain request
    #: handler, its fastest) or "public" (``async for item in node.received()`` and an async request
    #: handler, what most applications write)
    api: str = "handler"

    def check(self) -> None:
        if self.mode not in ("datagram", "message", "request", "bulk"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.size < MIN_SIZE:
            raise ValueError(f"--size must be at least {MIN_SIZE} bytes (sequence number and timestamp)")
        if self.mode == "datagram" and self.size > 1169:
            raise ValueError("--size for datagrams must be at most 1169 bytes (max_datagram_payload)")
        if self.peers < 1 or self.peers > 64:
            raise ValueError("--peers must be between 1 and 64")
        if self.msgs is None and self.duration is None:
            self.msgs = 100_000 if self.mode in ("datagram", "message") else 10_000
            if self.mode == "bulk":
                self.msgs = 64
        if not self.host.startswith("127."):
            raise ValueError("bench runs on the loopback range 127.0.0.0/8 only")
        if self.durable is not None and (self.mode != "message" or self.impl != "quicmesh"):
            raise ValueError("--durable is for `quicmesh bench message` with --impl quicmesh")
        if self.relayed and (self.impl != "quicmesh" or self.durable is not None):
            raise ValueError("--relayed is for --impl quicmesh, without --durable")
        if self.api not in ("handler", "public"):
            raise ValueError(f"unknown api {self.api!r} (handler or public)")
        if self.relayed and (self.max_datagram_size or 0) < RELAY_DATAGRAM_SIZE:
            self.max_datagram_size = RELAY_DATAGRAM_SIZE
        self.loop = resolve_loop(self.loop)


def make_bench_mesh(directory: Path, names: list[str], host: str) -> dict[str, Path]:
    """A throwaway CA and one node directory per name, on free ports of ``host``: name -> node.toml."""
    from pki.bootstrap import bootstrap, parse_node_spec

    ports = free_udp_ports(len(names), host)
    specs = [parse_node_spec(f"{name}={host}:{port}") for name, port in zip(names, ports)]
    bootstrap(directory, "bench", specs)
    return {name: directory / name / "node.toml" for name in names}


class _Worker:
    def __init__(self, name: str, process: asyncio.subprocess.Process, stderr: TextIO) -> None:
        self.name = name
        self.process = process
        self.stderr = stderr
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.count = 0
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "progress":
                self.count = event["count"]
            else:
                await self.events.put(event)
        await self.events.put({"event": "exit"})

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            event = await self.events.get()
        if event["event"] != kind:
            raise RuntimeError(f"bench process {self.name}: {event.get('message') or event['event']}"
                               f"{self.tail()}")
        return event

    def say(self, word: str) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            self.process.stdin.write(word.encode() + b"\n")

    def tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        text = self.stderr.read()[-2000:].strip()
        return f"\n--- its stderr:\n{text}" if text else ""

    async def finish(self) -> None:
        try:
            async with asyncio.timeout(EXIT_TIMEOUT):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        self.reader.cancel()


async def _spawn(name: str, job: dict[str, Any], stderr: TextIO) -> _Worker:
    return await _spawn_generic(name, ["-m", "quicmesh.bench.worker", json.dumps(job)], stderr)


async def _spawn_generic(name: str, args: list[str], stderr: TextIO) -> _Worker:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env,
    )
    return _Worker(name, process, stderr)


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one bench and return its result document (see :func:`summarize`)."""
    options.check()
    with tempfile.TemporaryDirectory(prefix="quicmesh-bench-") as tmp:
        senders = [f"send{i + 1}" for i in range(options.peers)]
        names = ["recv", *senders, *([RELAY] if options.relayed else [])]
        configs = make_bench_mesh(Path(tmp) / "mesh", names, options.host)
        raw = asyncio.run(_orchestrate(options, configs, senders, Path(tmp), progress))
    return summarize(options, raw)


async def _orchestrate(options: BenchOptions, configs: dict[str, Path], senders: list[str], tmp: Path,
                       progress: Callable[[str], None] | None) -> dict[str, Any]:
    timeout = options.timeout if options.duration is None else options.duration + 30.0
    base = {"impl": options.impl, "mode": options.mode, "size": options.size, "rate": None, "loop": options.loop,
            "duration": options.duration, "timeout": timeout, "durable": options.durable, "tmp": str(tmp),
            "max_datagram_size": options.max_datagram_size, "ping": options.relayed, "api": options.api}
    relay = [RELAY] if options.relayed else []
    workers: list[_Worker] = []
    try:
        jobs = {"recv": {**base, "name": "recv", "role": "recv", "config": str(configs["recv"]),
                         "peers": senders + relay, "unreachable": senders if relay else [], "msgs": None}}
        per_sender, extra = divmod(options.msgs or 0, len(senders))
        for index, name in enumerate(senders):
            jobs[name] = {**base, "name": name, "role": "send", "config": str(configs[name]),
                          "peers": ["recv", *relay], "unreachable": ["recv"] if relay else [],
                          "target": "recv", "msgs": (per_sender + (index < extra)) if options.msgs else None,
                          "rate": (options.rate / len(senders)) if options.rate else None}
        if relay:
            jobs[RELAY] = {**base, "name": RELAY, "role": RELAY, "config": str(configs[RELAY]),
                           "peers": ["recv", *senders], "unreachable": [], "msgs": None}
        for name, job in jobs.items():
            workers.append(await _spawn(name, job, open(tmp / f"{name}.stderr", "w+")))
        ready = await asyncio.gather(*(w.expect("ready", READY_TIMEOUT) for w in workers))
        loop_kind = ready[0].get("loop", "?")
        receiver, sender_workers = workers[0], workers[1:1 + len(senders)]
        paths = {w.name: event.get("paths", {}) for w, event in zip(workers, ready)}
        _check_paths(options, senders, paths)
        started = time.monotonic()
        for worker in sender_workers:
            worker.say("go")
        waiting = [asyncio.ensure_future(w.expect("done", timeout + 5)) for w in sender_workers]
        last_shown = started
        while not all(task.done() for task in waiting):
            await asyncio.wait(waiting, timeout=0.5)
            if progress is not None and time.monotonic() - last_shown >= 1.0 and not all(t.done() for t in waiting):
                last_shown = time.monotonic()
                sent = sum(w.count for w in sender_workers)
                progress(f"{time.monotonic() - started:6.1f}s  sent {sent:,}  received {receiver.count:,}")
        sent_results = {w.name: task.result() for w, task in zip(sender_workers, waiting)}
        receiver.say("stop")
        received = await receiver.expect("done", 15.0)
        for worker in sender_workers:
            worker.say("stop")
        raw = {"senders": sent_results, "receiver": received, "loop": loop_kind, "paths": paths,
               "rtt": {w.name: event.get("rtt", {}) for w, event in zip(workers, ready)}}
        if relay:
            workers[-1].say("stop")
            raw["relay"] = (await workers[-1].expect("done", 15.0)).get("relay")
        return raw
    finally:
        for worker in workers:
            worker.say("stop")
        await asyncio.gather(*(w.finish() for w in workers), return_exceptions=True)
        for worker in workers:
            worker.stderr.close()


def _check_paths(options: BenchOptions, senders: list[str], paths: dict[str, dict[str, str | None]]) -> None:
    """A relayed run whose traffic went direct (or the other way round) would measure the wrong thing."""
    wanted = f"via {RELAY}" if options.relayed else "direct"
    for name in senders:
        path = paths.get(name, {}).get("recv")
        if path is not None and path != wanted:  # None: bare aioquic, which has no paths
            raise RuntimeError(f"bench process {name} reaches recv {path}, not {wanted}")


def summarize(options: BenchOptions, raw: dict[str, Any]) -> dict[str, Any]:
    """Per-peer lines and aggregate figures from what the processes measured."""
    mode = options.mode
    received_by = raw["receiver"]["peers"]
    peers = []
    for name, sent in raw["senders"].items():
        got = received_by.get(name, {"received": 0, "bytes": 0, "first": None, "last": None})
        if mode == "datagram":
            span = (got["last"] - got["first"]) if got["first"] is not None else 0.0
            count, nbytes = got["received"], got["bytes"]
        else:
            span = sent["end"] - sent["start"]
            count, nbytes = sent["sent"], sent["bytes"]
        peers.append({
            "peer": name,
            "sent": sent["sent"],
            "received": got["received"],
            "dropped_at_sender": sent["dropped_at_sender"],
            "loss_pct": _loss(sent["sent"], got["received"]) if mode == "datagram" else 0.0,
            "seconds": span,
            "msgs_per_s": count / span if span > 0 else None,
            "mb_per_s": nbytes / span / 1e6 if span > 0 else None,
            "timed_out": sent["timed_out"],
            "latency_us": sent["latency"],
        })
    total_sent = sum(p["sent"] for p in peers)
    total_received = sum(p["received"] for p in peers)
    if mode == "datagram":
        firsts = [g["first"] for g in received_by.values() if g["first"] is not None]
        lasts = [g["last"] for g in received_by.values() if g["last"] is not None]
        span = (max(lasts) - min(firsts)) if firsts else 0.0
        count = total_received
        latency = raw["receiver"]["latency"]
        latency_kind = "one-way, send to receive"
    else:
        span = max(s["end"] for s in raw["senders"].values()) - min(s["start"] for s in raw["senders"].values())
        count = total_sent
        latency = _merge_latency([p["latency_us"] for p in peers])
        latency_kind = {"message": "send to acknowledgement", "request": "request to reply",
                        "bulk": "chunk send to acknowledgement"}[mode]
        if options.durable:  # the rate counts until the last one was delivered (the outbox drained)
            latency_kind = f"durable send to commit in the outbox, sync={options.durable}"
    return {
        "schema": 1,
        "impl": options.impl,
        "mode": mode,
        "loop": options.loop,
        "size": options.size,
        "msgs": options.msgs,
        "duration": options.duration,
        "rate": options.rate,
        "peers": options.peers,
        "durable": options.durable,
        "relayed": options.relayed,
        "max_datagram_size": options.max_datagram_size,
        "api": options.api,
        "paths": raw.get("paths", {}),
        "rtt_us": {name: {peer: rtt * 1e6 for peer, rtt in rtts.items() if rtt is not None}
                   for name, rtts in raw.get("rtt", {}).items()},
        "relay": raw.get("relay"),
        "senders": peers,
        "aggregate": {
            "sent": total_sent,
            "received": total_received,
            "lost": max(0, total_sent - total_received) if mode == "datagram" else 0,
            "loss_pct": _loss(total_sent, total_received) if mode == "datagram" else 0.0,
            "seconds": span,
            "msgs_per_s": count / span if span > 0 else None,
            "mb_per_s": count * options.size / span / 1e6 if span > 0 else None,
        },
        "latency_us": latency,
        "latency_kind": latency_kind,
        "cpu_s": {"receiver": raw["receiver"].get("cpu"),
                  "senders": sum(s.get("cpu") or 0.0 for s in raw["senders"].values())},
    }


def _loss(sent: int, received: int) -> float:
    return 0.0 if sent <= 0 else max(0.0, min(100.0, 100.0 * (sent - received) / sent))


def _merge_latency(parts: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Across senders: the worst of each percentile (exact for one sender, an upper bound for several)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {key: max(p[key] for p in parts) for key in ("p50", "p90", "p99", "max")} | {
        "count": sum(p["count"] for p in parts)}


# --- rendering -------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def banner(options: BenchOptions) -> str:
    amount = f"{options.msgs:,} msgs" if options.msgs else f"{options.duration:g}s"
    rate = f"{options.rate:,.0f}/s" if options.rate else "unlimited"
    return (f"quicmesh bench: {options.mode}, {options.peers} sender(s) -> 1 receiver on {options.host}, "
            f"{amount} of {options.size} B, rate {rate}, impl {options.impl}, loop {options.loop}, "
            f"separate processes")


def count_of(result: dict[str, Any]) -> int:
    agg = result["aggregate"]
    return agg["received"] if result["mode"] == "datagram" else agg["sent"]


def render_text(result: dict[str, Any]) -> str:
    lines = []
    datagram = result["mode"] == "datagram"
    for peer in result["senders"]:
        line = (f"  [{peer['peer']}] sent {peer['sent']:,}  received {peer['received']:,}"
                f"  {_num(peer['msgs_per_s'])} msgs/s  {_num(peer['mb_per_s'], ',.2f')} MB/s")
        if datagram:
            line += f"  loss {peer['loss_pct']:.2f}% (dropped at sender {peer['dropped_at_sender']:,})"
        if peer["timed_out"]:
            line += "  TIMED OUT"
        lines.append(line)
    agg = result["aggregate"]
    line = (f"  aggregate: {_num(agg['msgs_per_s'])} msgs/s  {_num(agg['mb_per_s'], ',.2f')} MB/s"
            f"  ({agg['sent']:,} sent, {agg['received']:,} received in {agg['seconds']:.2f}s)")
    if datagram:
        line += f"  loss {agg['loss_pct']:.2f}%"
    lines.append(line)
    cpu = result["cpu_s"]
    if cpu["receiver"] is not None and count_of(result):
        lines.append(f"  cpu: receiver {cpu['receiver']:.2f}s ({cpu['receiver'] / count_of(result) * 1e6:.1f} us/msg), "
                     f"senders {cpu['senders']:.2f}s ({cpu['senders'] / count_of(result) * 1e6:.1f} us/msg)")
    lat = result["latency_us"]
    if lat:
        lines.append(f"  latency ({result['latency_kind']}, {lat['count']:,} samples): p50 {lat['p50']:,.0f} us"
                     f"  p90 {lat['p90']:,.0f} us  p99 {lat['p99']:,.0f} us  max {lat['max']:,.0f} us")
    return "\n".join(lines)


CSV_FIELDS = ("impl", "mode", "loop", "peer", "sent", "received", "loss_pct", "seconds", "msgs_per_s", "mb_per_s",
              "p50_us", "p90_us", "p99_us", "max_us")


def render_csv(result: dict[str, Any]) -> str:
    rows = [",".join(CSV_FIELDS)]
    lat = result["latency_us"] or {}

    def row(peer: str, figures: dict[str, Any], latency: dict[str, Any]) -> str:
        values = [result["impl"], result["mode"], result["loop"], peer, figures["sent"], figures["received"],
                  figures["loss_pct"], figures["seconds"], figures["msgs_per_s"], figures["mb_per_s"],
                  latency.get("p50"), latency.get("p90"), latency.get("p99"), latency.get("max")]
        return ",".join("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in values)

    for peer in result["senders"]:
        rows.append(row(peer["peer"], peer, peer["latency_us"] or {}))
    rows.append(row("aggregate", result["aggregate"], lat))
    return "\n".join(rows)


def render_durable(results: list[dict[str, Any]]) -> str:
    """`bench message --durable`: the non-durable run beside sync=normal and sync=full."""
    plain = results[0]["aggregate"]["msgs_per_s"] or 0.0
    lines = [f"  {'':<20}{'msgs/s':>10}{'of plain':>10}{'p50 us':>10}{'p99 us':>10}  latency"]
    for result in results:
        rate, lat = result["aggregate"]["msgs_per_s"], result["latency_us"] or {}
        share = f"{rate / plain:.0%}" if rate and plain else "-"
        kind = "send to ack by the peer" if result["durable"] is None else "send to commit (delivered: rate)"
        name = "message" if result["durable"] is None else f"durable sync={result['durable']}"
        lines.append(f"  {name:<20}{_num(rate):>10}{share:>10}{_num(lat.get('p50')):>10}{_num(lat.get('p99')):>10}"
                     f"  {kind}")
    return "\n".join(lines)


def render_relayed(results: list[dict[str, Any]]) -> str:
    """`bench MODE --relayed`: direct beside relayed, and the issue's targets: relayed >= 50 % of direct
    throughput; added p50 <= one extra hop's RTT + 300 us (see :func:`hop_rtt_us`)."""
    direct, relayed = results
    lines = [f"  {'':<12}{'msgs/s':>10}{'of direct':>11}{'p50 us':>10}{'p99 us':>10}  latency ({direct['latency_kind']})"]
    for result in results:
        rate, lat = result["aggregate"]["msgs_per_s"], result["latency_us"] or {}
        share = f"{rate / direct['aggregate']['msgs_per_s']:.0%}" if rate and direct["aggregate"]["msgs_per_s"] else "-"
        name = "via relay" if result["relayed"] else "direct"
        lines.append(f"  {name:<12}{_num(rate):>10}{share:>11}{_num(lat.get('p50')):>10}{_num(lat.get('p99')):>10}")
    rates = direct["aggregate"]["msgs_per_s"], relayed["aggregate"]["msgs_per_s"]
    if all(rates):
        verdict = "met" if rates[1] >= 0.5 * rates[0] else "NOT met"
        lines.append(f"  throughput: relayed {rates[1] / rates[0]:.0%} of direct (target >= 50 %: {verdict})")
    added, hop = added_p50_us(direct, relayed), hop_rtt_us(direct)
    if added is not None and hop is not None:
        verdict = "met" if added <= hop + 300 else "NOT met"
        ping = relayed["rtt_us"].get(relayed["senders"][0]["peer"], {}).get(RELAY)
        lines.append(f"  added p50: {added:,.0f} us; one hop's RTT {hop:,.0f} us (from the direct run; median "
                     f"QUIC PING sender -> relay {_num(ping)} us) -> target <= {hop + 300:,.0f} us: {verdict}")
    return "\n".join(lines)


def added_p50_us(direct: dict[str, Any], relayed: dict[str, Any]) -> float | None:
    p50s = [(result["latency_us"] or {}).get("p50") for result in (direct, relayed)]
    return None if None in p50s else p50s[1] - p50s[0]


def hop_rtt_us(direct: dict[str, Any]) -> float | None:
    """One hop's round trip under the same load, from the direct run: its p50 for the round-trip modes, twice
    its p50 for datagrams (one-way). On loopback the relay's hops are the same kind of hop."""
    p50 = (direct["latency_us"] or {}).get("p50")
    if p50 is None:
        return None
    return 2 * p50 if direct["mode"] == "datagram" else p50
