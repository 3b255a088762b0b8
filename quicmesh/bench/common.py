"""Small pieces shared by the bench processes: payloads, latency samples, percentiles, event loops."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from array import array
from collections.abc import Callable, Coroutine
from typing import Any

#: Every bench payload starts with a sequence number and the sender's time.monotonic() (CLOCK_MONOTONIC is
#: one clock for all processes of the machine, so the receiver can take one-way latency from it).
HEADER = struct.Struct("<Qd")
MIN_SIZE = HEADER.size
#: Latency samples kept per process (beyond it, every other sample is dropped: still a fair sample).
MAX_SAMPLES = 1_000_000


def loop_names() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


def resolve_loop(name: str) -> str:
    """``auto`` -> uvloop when importable, else asyncio."""
    if name == "auto":
        return "uvloop" if "uvloop" in loop_names() else "asyncio"
    if name == "uvloop" and "uvloop" not in loop_names():
        raise ValueError("uvloop is not installed (pip install 'quicmesh[fast]')")
    return name


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if resolve_loop(loop) == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


class Samples:
    """Latency samples in seconds, bounded in memory."""

    def __init__(self) -> None:
        self.values = array("d")
        self._stride = 1
        self._skip = 0

    def add(self, value: float) -> None:
        if self._skip:
            self._skip -= 1
            return
        self.values.append(value)
        self._skip = self._stride - 1
        if len(self.values) >= MAX_SAMPLES:
            self.values = self.values[::2]
            self._stride *= 2


def percentiles(values: Any) -> dict[str, float] | None:
    """p50/p90/p99/max in microseconds (nearest rank), or None without samples."""
    ordered = sorted(values)
    if not ordered:
        return None
    count = len(ordered)

    def rank(p: float) -> float:
        index = max(0, min(count - 1, int(-(-p * count // 100)) - 1))
        return ordered[index] * 1e6

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1] * 1e6, "count": count}


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout: how a worker talks to the runner."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


#: The bench clock (one for all processes of the machine); the function itself, not a wrapper: it runs per datagram.
now = time.monotonic
