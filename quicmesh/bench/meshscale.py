"""An N-node full mesh on 127.0.0.x, one process per node: time to converge, memory per connection, idle CPU.

``python -m quicmesh.bench.meshscale 8 16 32`` (also ``compare --mesh 8,16,32``). Each node process loads
its config and credentials, then waits; all are told to start at once, and convergence is the time from
that moment until every node has every peer connected. The mesh forms from static lists (every node's
[[peers]] names all the others, as `quicmesh-pki bootstrap` writes them) or, with ``--seed``, from one seed
(issue 16: no [[peers]], ``[mesh] members = "any-certified"``, ``seeds = [node 0]``: each node learns the
others from signed announcements); ``--both`` measures both, side by side, in one run (``meshscale 8 16 32
--both``). Memory: each node's resident-set growth from started to converged, divided by its N-1
connections, includes what starting costs once (modules loaded on first use, ~3 MiB); the marginal figure, the growth of a node's resident set from one mesh size to the
next divided by the connections it gained, is what one more connection costs. Idle CPU is what all the
processes used over a quiet interval once converged (keepalives only), in percent of one core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quicmesh.bench.common import emit, resolve_loop, run_on
from quicmesh.bench.runner import _spawn_generic

CONVERGE_TIMEOUT = float(os.environ.get("QUICMESH_MESHSCALE_TIMEOUT", "60"))
IDLE_SETTLE = 2.0
IDLE_MEASURE = 5.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _rss() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * _PAGE


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


async def _node_main(config_path: str, host: str, seed: str | None, members: int) -> int:
    from quicmesh.config import MeshSection, load_config, parse_address
    from quicmesh.runtime.node import Node

    import logging

    logging.basicConfig(level=logging.INFO, format="%(created).3f %(name)s: %(message)s")  # to its .stderr file
    config = load_config(config_path)
    # Bind the node's own 127.0.0.x, not bootstrap's 0.0.0.0: from a wildcard socket the kernel answers a
    # peer that dialed 127.0.0.x from 127.0.0.1, and aioquic's client ignores a handshake from another address.
    config = dataclasses.replace(config, node=dataclasses.replace(
        config.node, listen=dataclasses.replace(config.node.listen, host=host)))
    if seed is not None:  # the static lists dropped: this node knows only the seed's address
        config = dataclasses.replace(config, peers=(), mesh=MeshSection(members="any-certified",
                                                                         seeds=(parse_address(seed),)))
    node = Node(config)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("loaded", rss=_rss())
    async with asyncio.timeout(CONVERGE_TIMEOUT):
        await reader.readline()  # "go"
    rss_before = _rss()
    await node.start()
    drops: list[str] = []

    async def watch_drops() -> None:  # a mesh that converged should stay up: say why if it does not
        async for event in node.events():
            if event.kind == "disconnected":
                drops.append(f"{event.peer}: {event.reason}")

    watcher = None
    try:
        if seed is None:
            await node.wait_connected(timeout=CONVERGE_TIMEOUT)
        else:
            async with asyncio.timeout(CONVERGE_TIMEOUT):
                while len(node.connected_peers()) < members - 1:
                    await asyncio.sleep(0.02)
        emit("converged", at=time.monotonic(), rss_before=rss_before, rss=_rss(),
             connections=len(node.connected_peers()))
        async with asyncio.timeout(CONVERGE_TIMEOUT + IDLE_SETTLE + IDLE_MEASURE + 30):
            await reader.readline()  # "settled": every node has converged, the idle phase begins
            watcher = asyncio.ensure_future(watch_drops())
            await reader.readline()  # "report"
            emit("final", rss=_rss(), connections=len(node.connected_peers()), drops=drops)
            await reader.readline()  # "stop" (or EOF): only now, so no node sees another's shutdown as a drop
    finally:
        if watcher is not None:
            watcher.cancel()
        await node.stop()
    return 0


def run_mesh(count: int, *, loop: str = "auto", log: Any = None, idle_settle: float = IDLE_SETTLE,
             idle_measure: float = IDLE_MEASURE, seed: bool = False) -> dict[str, Any]:
    """Start ``count`` nodes, one process each, and measure; returns the figures. ``seed``: the nodes know
    only node 0's address instead of each other (open membership)."""
    from pki.bootstrap import bootstrap, parse_node_spec

    if not 2 <= count <= 200:
        raise ValueError("mesh size must be between 2 and 200")
    loop = resolve_loop(loop)
    with tempfile.TemporaryDirectory(prefix="quicmesh-meshscale-") as tmp:
        specs = []
        for index in range(count):
            host = f"127.0.0.{10 + index}"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
            specs.append(parse_node_spec(f"n{index}={host}:{port}"))
        bootstrap(Path(tmp), "scale", specs)
        configs = [(str(Path(tmp) / spec.name / "node.toml"), spec.host) for spec in specs]
        seed_address = f"{specs[0].host}:{specs[0].port}" if seed else None
        result = asyncio.run(_measure(configs, loop, Path(tmp), idle_settle, idle_measure, seed_address))
    result["nodes"] = count
    result["loop"] = loop
    result["formed"] = "seed" if seed else "static"
    if log:
        log(f"  mesh of {count}{_formed(result)}: converged in {result['converge_s']:.2f}s, "
            f"{result['kib_per_connection']:.0f} KiB/connection, idle CPU {result['idle_cpu_pct']:.1f}% of one core")
    return result


async def _measure(configs: list[tuple[str, str]], loop: str, tmp: Path, idle_settle: float,
                   idle_measure: float, seed: str | None) -> dict[str, Any]:
    workers = []
    try:
        for index, (config, host) in enumerate(configs):
            args = ["-m", "quicmesh.bench.meshscale", "--node", config, "--host", host, "--loop", loop,
                    "--members", str(len(configs)), *(["--seed-address", seed] if seed else [])]
            workers.append(await _spawn_generic(f"n{index}", args, open(tmp / f"n{index}.stderr", "w+")))
        await asyncio.gather(*(w.expect("loaded", CONVERGE_TIMEOUT) for w in workers))
        go = time.monotonic()
        for worker in workers:
            worker.say("go")
        converged = await asyncio.gather(*(w.expect("converged", CONVERGE_TIMEOUT + 5) for w in workers))
        converge_s = max(event["at"] for event in converged) - go
        for worker in workers:
            worker.say("settled")
        await asyncio.sleep(idle_settle)
        pids = [w.process.pid for w in workers]
        cpu0 = sum(_cpu_of(pid) for pid in pids)
        t0 = time.monotonic()
        await asyncio.sleep(idle_measure)
        cpu = sum(_cpu_of(pid) for pid in pids) - cpu0
        idle_pct = 100.0 * cpu / (time.monotonic() - t0)
        for worker in workers:
            worker.say("report")
        final = await asyncio.gather(*(w.expect("final", 15) for w in workers))
        growth = [(event["rss"] - event["rss_before"]) / max(1, event["connections"]) for event in converged]
        return {
            "converge_s": converge_s,
            "kib_per_connection": sum(growth) / len(growth) / 1024,
            "max_kib_per_connection": max(growth) / 1024,
            "rss_mib_per_node": sum(e["rss"] for e in final) / len(final) / 2**20,
            "converged_rss_mib_per_node": sum(e["rss"] for e in converged) / len(converged) / 2**20,
            "idle_cpu_pct": idle_pct,
            "idle_cpu_pct_per_node": idle_pct / len(workers),
            "still_connected": all(e["connections"] == len(configs) - 1 for e in final),
            "drops_while_idle": [f"n{index} lost {drop}" for index, e in enumerate(final) for drop in e["drops"]],
        }
    finally:
        for worker in workers:
            worker.say("stop")
        await asyncio.gather(*(w.finish() for w in workers), return_exceptions=True)
        for worker in workers:
            worker.stderr.close()


def add_marginal(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``marginal_kib_per_connection`` of each result after the first of the same formation: what a node's
    resident set grew by from the previous (smaller) mesh, per connection gained."""
    for formed in {r.get("formed", "static") for r in results}:
        same = sorted((r for r in results if r.get("formed", "static") == formed), key=lambda r: r["nodes"])
        _add_marginal(same)
    return results


def _add_marginal(results: list[dict[str, Any]]) -> None:
    for smaller, larger in zip(results, results[1:]):
        gained = larger["nodes"] - smaller["nodes"]
        if gained > 0:
            grown = larger["converged_rss_mib_per_node"] - smaller["converged_rss_mib_per_node"]
            larger["marginal_kib_per_connection"] = grown * 1024 / gained


def render_mesh(results: list[dict[str, Any]]) -> str:
    lines = ["| full mesh (one process per node, 127.0.0.x) | converge | growth per connection (incl. start) "
             "| marginal per connection | idle CPU (all nodes) | idle CPU per node | still all connected |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        marginal = r.get("marginal_kib_per_connection")
        lines.append(f"| {r['nodes']} nodes, {r['nodes'] * (r['nodes'] - 1) // 2} connections{_formed(r)} "
                     f"({r['loop']}) | "
                     f"{r['converge_s']:.2f} s | {r['kib_per_connection']:.0f} KiB (max {r['max_kib_per_connection']:.0f}) | "
                     f"{'-' if marginal is None else f'{marginal:.0f} KiB'} | "
                     f"{r['idle_cpu_pct']:.1f}% of a core | {r['idle_cpu_pct_per_node']:.2f}% | "
                     f"{'yes' if r['still_connected'] else 'NO'} |")
    for r in results:
        drops = r.get("drops_while_idle", [])
        if drops:
            lines.append(f"\n{r['nodes']} nodes{_formed(r)}: {len(drops)} disconnects while idle, e.g. "
                         + "; ".join(drops[:5]))
    return "\n".join(lines)


def _formed(result: dict[str, Any]) -> str:
    return ", from one seed" if result.get("formed") == "seed" else ""


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m quicmesh.bench.meshscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[8, 16, 32])
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    formation = parser.add_mutually_exclusive_group()
    formation.add_argument("--seed", action="store_true",
                           help="form each mesh from one seed (no [[peers]]; members learnt from announcements)")
    formation.add_argument("--both", action="store_true",
                           help="measure each size from static lists and from one seed, side by side")
    parser.add_argument("--seed-address", help=argparse.SUPPRESS)  # a node of a --seed mesh: node 0's address
    parser.add_argument("--members", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        return run_on(args.loop, lambda: _node_main(args.node, args.host, args.seed_address, args.members or 0))
    seeded = (False, True) if args.both else (args.seed,)
    results, unconverged = [], []
    for count in sorted(args.sizes):
        for seed in seeded:
            try:
                results.append(run_mesh(count, loop=args.loop, seed=seed,
                                        log=lambda line: print(line, file=sys.stderr, flush=True)))
            except (TimeoutError, RuntimeError) as error:  # one mesh that does not form must not lose the others'
                lines = str(error).splitlines()  # RuntimeError: a node process gave up first (or crashed): its last line
                why = f": {lines[0]} ({lines[-1].strip()})" if lines else ""
                unconverged.append(f"{count} nodes{_formed({'formed': 'seed' if seed else 'static'})}: did not "
                                   f"converge within {CONVERGE_TIMEOUT:g} s (QUICMESH_MESHSCALE_TIMEOUT){why}")
                print(f"  {unconverged[-1]}", file=sys.stderr, flush=True)
    add_marginal(results)
    print(json.dumps(results, indent=2) if args.json else "\n".join([render_mesh(results), *unconverged]))
    return 1 if unconverged else 0


if __name__ == "__main__":
    sys.exit(main())
