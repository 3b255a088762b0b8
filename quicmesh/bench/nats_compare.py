"""``python -m quicmesh.bench.compare --nats``: quicmesh subjects and requests beside NATS, in one run.

For each event loop, alternately and ``--repeat`` times each (best kept, as in :mod:`.compare`):
quicmesh's ``bench pubsub`` runs (unreliable fan-out from one publisher process to 1 and to 3 subscriber
processes; sequential requests by subject), quicmesh's plain sequential requests to a named peer
(``bench request``, with its plain handler and with the public API's async handler), and the same figures against a nats-server started for the run (TLS, client certificates
required) with nats-py clients, one process each, same event loop, same 100-byte payloads (:mod:`.nats`).
Prints a table with quicmesh / NATS and the targets of issues 17 and 20.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from quicmesh.bench import pubsub
from quicmesh.bench.common import run_on
from quicmesh.bench.nats import find_nats, run_nats_bench, server_version
from quicmesh.bench.runner import BenchOptions, make_bench_mesh, run_bench


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    higher_is_better: bool | None  # None: no ratio (loss)
    target: str = ""  # "ratio>=1" or "ratio<=1": the issues' target for this row


def _fanout_rows(subscribers: int) -> list[Row]:
    what = f"fan-out to {subscribers} subscriber process{'es' if subscribers > 1 else ''}"
    key = f"fanout{subscribers}"
    return [Row(f"{key}_rate", f"{what}: msgs/s delivered", True, "ratio>=1"),
            Row(f"{key}_loss", f"{what}: loss %", None),
            Row(f"{key}_p50", f"{what}: one-way latency p50 (us)", False),
            Row(f"{key}_p99", f"{what}: one-way latency p99 (us)", False)]


ROWS = [
    *_fanout_rows(1),
    *_fanout_rows(3),
    Row("subject_rate", "sequential requests/s: quicmesh by subject, NATS request/reply", True, "ratio>=1"),
    Row("subject_p50", "request round trip p50 (us): by subject", False, "ratio<=1"),
    Row("peer_rate", "sequential requests/s: quicmesh to a named peer, NATS request/reply", True, "ratio>=1"),
    Row("peer_p50", "request round trip p50 (us): to a named peer", False, "ratio<=1"),
    Row("public_rate", "sequential requests/s: to a named peer, async handler (public API), NATS request/reply",
        True, "ratio>=1"),
    Row("public_p50", "request round trip p50 (us): to a named peer, async handler", False, "ratio<=1"),
]
#: quicmesh's bench pubsub and the NATS run both run these (mode, subscriber processes).
RUNS = pubsub.RUNS


def counts(scale: float) -> dict[str, int]:
    """Publishes per fan-out run and requests per request run."""
    return {"fanout": max(100, int(pubsub.DEFAULT_FANOUT_MSGS * scale)),
            "request": max(20, int(pubsub.DEFAULT_REQUESTS * scale))}


def _pubsub_values(results: list[dict[str, Any]], subject_prefix: str = "subject") -> dict[str, float | None]:
    """Row key -> value from a list of :mod:`.pubsub`-style results (quicmesh's or NATS's)."""
    values: dict[str, float | None] = {}
    for result in results:
        latency = result["latency_us"] or {}
        if result["mode"] == "fanout":
            key = f"fanout{result['subscribers']}"
            values |= {f"{key}_rate": result["per_s"], f"{key}_loss": result["loss_pct"],
                       f"{key}_p50": latency.get("p50"), f"{key}_p99": latency.get("p99")}
        else:
            values |= {f"{subject_prefix}_rate": result["per_s"], f"{subject_prefix}_p50": latency.get("p50")}
    return values


def quicmesh_pubsub(options: pubsub.PubSubBenchOptions, amounts: dict[str, int]) -> list[dict[str, Any]]:
    """quicmesh's ``bench pubsub`` runs with a count per mode (``run_pubsub_bench`` has one for all)."""
    results = []
    for mode, subscribers in RUNS:
        with tempfile.TemporaryDirectory(prefix="quicmesh-bench-pubsub-") as tmp:
            names = ["pub", *(f"sub{i + 1}" for i in range(subscribers))]
            configs = make_bench_mesh(Path(tmp) / "mesh", names, options.host)
            run_options = dataclasses.replace(options, msgs=amounts[mode])
            results.append(run_on("asyncio", lambda: pubsub._orchestrate(run_options, mode, configs)))
    return results


def measure_nats(loop: str, repeat: int, scale: float, binary: str, log: Callable[[str], None]) -> dict[str, Any]:
    """{row key: {"quicmesh": best, "nats": best, "quicmesh_all": [...], "nats_all": [...]}} for one loop."""
    amounts = counts(scale)
    options = pubsub.PubSubBenchOptions(loop=loop)
    runs: dict[str, list[dict[str, float | None]]] = {"quicmesh": [], "nats": []}
    for attempt in range(repeat):
        for side in ("quicmesh", "nats") if attempt % 2 == 0 else ("nats", "quicmesh"):
            if side == "nats":
                results = run_nats_bench(options, binary, RUNS, amounts)
                values = (_pubsub_values(results) | _pubsub_values(results, "peer")
                          | _pubsub_values(results, "public"))
            else:
                results = quicmesh_pubsub(options, amounts)
                values = _pubsub_values(results)
                for prefix, api in (("peer", "handler"), ("public", "public")):
                    plain = run_bench(BenchOptions(mode="request", msgs=amounts["request"], loop=loop, api=api))
                    values |= {f"{prefix}_rate": plain["aggregate"]["msgs_per_s"],
                               f"{prefix}_p50": (plain["latency_us"] or {}).get("p50")}
            runs[side].append(values)
            log(f"  {loop:7} {side:8} " + "  ".join(
                f"{key} {_fmt(values.get(key), '.2f' if key.endswith('loss') else ',.0f')}" for key in
                ("fanout1_rate", "fanout1_loss", "fanout3_rate", "fanout3_loss", "subject_rate", "peer_rate",
                 "public_rate")))
    entries: dict[str, Any] = {}
    for row in ROWS:
        entry: dict[str, Any] = {}
        for side, side_runs in runs.items():
            values = [v for v in (run.get(row.key) for run in side_runs) if v is not None]
            entry[side] = (max(values) if row.higher_is_better else min(values)) if values else None
            entry[f"{side}_all"] = values
        entries[row.key] = entry
    return entries


def render_nats(loop_results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for loop, entries in loop_results.items():
        lines.append(f"| figure ({loop}) | quicmesh | NATS | quicmesh / NATS | target |")
        lines.append("|---|---:|---:|---:|---|")
        for row in ROWS:
            ours, theirs = entries[row.key]["quicmesh"], entries[row.key]["nats"]
            fmt = ".2f" if row.higher_is_better is None else ",.0f"
            ratio = ours / theirs if row.higher_is_better is not None and ours and theirs else None
            better = "" if row.higher_is_better is None else (
                " (higher is better)" if row.higher_is_better else " (lower is better)")
            lines.append(f"| {row.label} | {_fmt(ours, fmt)} | {_fmt(theirs, fmt)} | "
                         f"{_fmt(ratio, '.2f')}{'x' if ratio is not None else ''}{better} | {_target(row, ratio)} |")
        lines.append("")
    return "\n".join(lines)


def _target(row: Row, ratio: float | None) -> str:
    if not row.target:
        return ""
    wanted = ">= 1.0x" if row.target == "ratio>=1" else "<= 1.0x"
    if ratio is None:
        return f"{wanted}: -"
    met = ratio >= 1.0 if row.target == "ratio>=1" else ratio <= 1.0
    return f"{wanted}: {'met' if met else 'NOT met'}"


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def compare_with_nats(loops: list[str], repeat: int, scale: float, server: str | None, info: dict[str, Any],
                      json_path: str | None, log: Callable[[str], None]) -> int:
    """The whole ``--nats`` comparison: one line and 0 when NATS is not there to measure."""
    binary, why = find_nats(server)
    if binary is None:
        print(f"NATS comparison skipped: {why}", flush=True)
        return 0
    nats_version = server_version(binary)
    amounts = counts(scale)
    print(f"against NATS: nats-server {nats_version} ({binary}) on 127.0.0.1, TLS with required client "
          f"certificates from a throwaway CA, nats-py {_package_version('nats-py')} clients; "
          f"{amounts['fanout']:,} publishes per fan-out run, {amounts['request']:,} requests per request run, "
          f"100 B payloads, each client in its own process", flush=True)
    loop_results: dict[str, dict[str, Any]] = {}
    try:
        for loop in loops:
            loop_results[loop] = measure_nats(loop, repeat, scale, binary, log)
    except (RuntimeError, OSError, TimeoutError) as error:
        print(f"NATS comparison failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              flush=True)
        log(str(error))
        return 1
    print(render_nats(loop_results), flush=True)
    if json_path:
        with open(json_path, "w") as file:
            json.dump({"machine": info, "nats": {"server": binary, "version": nats_version, "counts": amounts,
                                                 "loops": loop_results}}, file, indent=2)
    return 0


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"
