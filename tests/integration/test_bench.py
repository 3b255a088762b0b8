"""`quicmesh bench` and the comparison tooling: short bounded runs of the real command, checked for sane
figures (counts add up, loss within 0..100 %, percentiles ordered). No timing asserts: numbers vary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quicmesh.bench.common import Samples, percentiles, resolve_loop
from quicmesh.bench.runner import BenchOptions, render_csv, render_text, summarize

BENCH = [sys.executable, "-m", "quicmesh", "bench"]


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args, "--timeout", "60"], capture_output=True, text=True, timeout=timeout)


def check_latency(latency: dict | None) -> None:
    assert latency is not None
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert latency["count"] >= 1


@pytest.mark.parametrize(
    ("mode", "args", "expected"),
    [
        ("datagram", ["--msgs", "2000"], 2000),
        ("message", ["--msgs", "2000"], 2000),
        ("request", ["--msgs", "300"], 300),
        ("bulk", ["--msgs", "4", "--size", "65536"], 4),
    ],
)
def test_each_mode_reports_sane_json(mode: str, args: list[str], expected: int) -> None:
    done = bench(mode, *args, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mode"] == mode and result["impl"] == "quicmesh" and result["peers"] == 1
    agg = result["aggregate"]
    assert agg["sent"] == expected
    assert sum(peer["sent"] for peer in result["senders"]) == agg["sent"]
    assert sum(peer["received"] for peer in result["senders"]) == agg["received"]
    assert 0.0 <= agg["loss_pct"] <= 100.0
    assert agg["received"] <= agg["sent"]
    if mode != "datagram":  # reliable: every message arrived, exactly once
        assert agg["received"] == agg["sent"] and agg["lost"] == 0
    assert agg["msgs_per_s"] > 0 and agg["mb_per_s"] > 0 and agg["seconds"] > 0
    check_latency(result["latency_us"])
    assert result["cpu_s"]["receiver"] >= 0


@pytest.mark.parametrize(("mode", "msgs"), [("datagram", 1500), ("message", 500), ("request", 200)])
def test_public_api_receiver(mode: str, msgs: int) -> None:
    """--api public: the receiver reads with `async for ... in received()` and answers with an async handler."""
    done = bench(mode, "--msgs", str(msgs), "--api", "public", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["api"] == "public"
    agg = result["aggregate"]
    assert agg["sent"] == msgs and 0 < agg["received"] <= msgs
    if mode != "datagram":
        assert agg["received"] == msgs
    check_latency(result["latency_us"])


def test_several_peers_rate_and_text_output() -> None:
    done = bench("datagram", "--msgs", "600", "--peers", "2", "--rate", "2000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("quicmesh bench: datagram, 2 sender(s) -> 1 receiver on 127.0.0.1, 600 msgs of 100 B")
    assert "rate 2,000/s" in lines[0]
    assert sum(1 for line in lines if line.startswith("  [send")) == 2
    assert any(line.startswith("  aggregate:") and "loss" in line for line in lines)
    assert any(line.startswith("  latency (one-way") for line in lines)


def test_bare_baseline_and_csv() -> None:
    done = bench("message", "--msgs", "500", "--impl", "bare", "--loop", "asyncio", "--csv")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split(",")[:4] == ["impl", "mode", "loop", "peer"]
    assert [row.split(",")[3] for row in rows] == ["send1", "aggregate"]
    assert all(row.startswith("bare,message,asyncio,") for row in rows)
    assert rows[-1].split(",")[4:6] == ["500", "500"]


def test_bad_arguments_are_one_line_errors() -> None:
    done = bench("datagram", "--size", "8")
    assert done.returncode == 2 and "--size must be at least 16" in done.stderr
    done = bench("datagram", "--size", "5000")
    assert done.returncode == 2 and "max_datagram_payload" in done.stderr
    done = bench("nonsense")
    assert done.returncode == 2


def test_percentiles_and_samples() -> None:
    assert percentiles([]) is None
    values = [i / 1e6 for i in range(1, 101)]  # 1..100 us
    p = percentiles(values)
    assert (round(p["p50"]), round(p["p90"]), round(p["p99"]), round(p["max"]), p["count"]) == (50, 90, 99, 100, 100)
    samples = Samples()
    for i in range(10):
        samples.add(float(i))
    assert list(samples.values) == [float(i) for i in range(10)]
    assert resolve_loop("asyncio") == "asyncio"
    assert resolve_loop("auto") in ("asyncio", "uvloop")


def test_summary_bounds_loss_and_renders() -> None:
    options = BenchOptions(mode="datagram", msgs=10)
    options.check()
    raw = {
        "senders": {"send1": {"sent": 10, "dropped_at_sender": 0, "bytes": 1000, "start": 1.0, "end": 2.0,
                              "timed_out": False, "latency": None, "cpu": 0.1}},
        "receiver": {"peers": {"send1": {"received": 7, "bytes": 700, "first": 1.1, "last": 1.8}},
                     "latency": {"p50": 10.0, "p90": 20.0, "p99": 30.0, "max": 40.0, "count": 7}, "cpu": 0.1},
    }
    result = summarize(options, raw)
    assert result["aggregate"]["loss_pct"] == pytest.approx(30.0)
    assert result["aggregate"]["lost"] == 3
    assert "loss 30.00%" in render_text(result)
    assert render_csv(result).splitlines()[-1].startswith("quicmesh,datagram,")


def test_mesh_scale_smoke() -> None:
    from quicmesh.bench.meshscale import add_marginal, render_mesh, run_mesh

    result = run_mesh(3, idle_settle=0.2, idle_measure=0.5)
    assert result["nodes"] == 3 and result["converge_s"] > 0 and result["still_connected"]
    assert result["kib_per_connection"] > 0 and result["idle_cpu_pct"] >= 0
    assert result["drops_while_idle"] == []
    assert "3 nodes, 3 connections" in render_mesh([result])
    # the marginal cost of a connection: a node's growth from the smaller mesh, per connection gained
    smaller = {**result, "nodes": 2, "converged_rss_mib_per_node": result["converged_rss_mib_per_node"] - 0.25}
    assert add_marginal([smaller, result])[1]["marginal_kib_per_connection"] == pytest.approx(256)
    assert "| 256 KiB |" in render_mesh([smaller, result])


def test_mesh_scale_from_one_seed() -> None:
    """meshscale --seed (issue 16): no [[peers]], every node knows only node 0, and the full mesh still forms."""
    from quicmesh.bench.meshscale import add_marginal, render_mesh, run_mesh

    result = run_mesh(3, seed=True, idle_settle=0.2, idle_measure=0.5)
    assert result["formed"] == "seed" and result["converge_s"] > 0 and result["still_connected"]
    assert result["drops_while_idle"] == []
    assert "3 nodes, 3 connections, from one seed" in render_mesh([result])
    # the marginal cost is taken between meshes formed the same way only
    static = {**result, "formed": "static", "nodes": 2}
    assert "marginal_kib_per_connection" not in add_marginal([static, result])[1]
