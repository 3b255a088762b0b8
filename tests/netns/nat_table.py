"""The NAT success table of docs/NAT.md: repeated trials of two nodes a and b behind each combination of NATs
(none, endpoint-independent, symmetric), with r on the public side as the only peer both reach.

    .venv/bin/python tests/netns/nat_table.py --trials 10      (root: network namespaces)

Each trial builds a fresh topology, starts the three daemons (the short timers of the netns tests), and watches
a's path to b for ``--watch`` seconds: ``direct`` (punched, or dialed when one side is public), ``via r`` or
nothing; the time from a's endpoint start (its log) to its first direct path to b; and flaps: the path lost, or
left for a worse one (relayed -> direct is the intended upgrade).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from netns.test_nat import make_mesh, seconds_after_start, started
from netns.test_relay import Mesh
from netns.topology import EIM, SYMMETRIC, Topology

COMBINATIONS = [(None, EIM), (None, SYMMETRIC), (EIM, EIM), (EIM, SYMMETRIC), (SYMMETRIC, SYMMETRIC)]


async def watch(mesh: Mesh, seconds: float) -> tuple[str | None, float | None, int]:
    """a's path to b at the end, seconds to the first direct path, flaps (a path lost or left for a worse one)."""
    started = time.monotonic()
    first_direct, changes, last = None, 0, None
    while time.monotonic() - started < seconds:
        path = await mesh.path("a", "b")
        if path == "direct" and first_direct is None:
            first_direct = time.monotonic() - started
        if last is not None and path != last and (last, path) != ("via r", "direct"):
            changes += 1  # lost, or left the direct path (the upgrade from relayed to direct is no flap)
        last = path if path is not None or last is None else last
        if first_direct is not None and time.monotonic() - started > first_direct + 2.0:
            break  # direct and stable for 2 s: done
        await asyncio.sleep(0.1)
    return last, first_direct, changes


def trial(nat_a: str | None, nat_b: str | None, seconds: float) -> tuple[str | None, float | None, int]:
    nat = {name: kind for name, kind in (("a", nat_a), ("b", nat_b)) if kind}
    with Topology(["r", "a", "b"], nat=nat) as net, tempfile.TemporaryDirectory(prefix="qmtab-") as directory:
        mesh = started(make_mesh(Path(directory), net))
        path, _, flaps = asyncio.run(watch(mesh, seconds))
        return path, seconds_after_start(mesh.log("a"), "peer=b ", "path=direct") if path == "direct" else None, flaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--watch", type=float, default=10.0, help="seconds to watch each trial")
    args = parser.parse_args()
    print("| a | b | trials | direct | relayed | none | time to direct (median, max) | flaps |")
    print("|---|---|---|---|---|---|---|---|")
    for nat_a, nat_b in COMBINATIONS:
        results = [trial(nat_a, nat_b, args.watch) for _ in range(args.trials)]
        direct = [t for path, t, _ in results if path == "direct" and t is not None]
        relayed = sum(1 for path, _, _ in results if path == "via r")
        times = f"{statistics.median(direct):.1f} s, {max(direct):.1f} s" if direct else "-"
        flaps = sum(changes for _, _, changes in results)
        print(f"| {nat_a or 'public'} | {nat_b or 'public'} | {len(results)} | {len(direct)} | {relayed} | "
              f"{len(results) - len(direct) - relayed} | {times} | {flaps} |", flush=True)


if __name__ == "__main__":
    main()
