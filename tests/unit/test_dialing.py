"""runtime/dialing.py: which socket addresses a peer's addresses give, their RFC 8305 order, and the race."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from quicmesh.runtime.dialing import STAGGER, interleave, race, resolve, sendable


def test_sendable_maps_ipv4_onto_a_dual_stack_socket_and_refuses_ipv6_on_an_ipv4_one() -> None:
    assert sendable("10.0.0.1", 4433, socket.AF_INET6) == ("::ffff:10.0.0.1", 4433)
    assert sendable("10.0.0.1", 4433, socket.AF_INET) == ("10.0.0.1", 4433)
    assert sendable("2001:db8::1", 4433, socket.AF_INET6) == ("2001:db8::1", 4433)
    assert sendable("2001:db8::1", 4433, socket.AF_INET) is None
    assert sendable("node.example", 4433, socket.AF_INET6) is None  # a name: resolved, not sent to


def test_interleave_puts_ipv6_first_then_alternates_and_drops_duplicates() -> None:
    v6a, v6b, v4a, v4b, v4c = ("2001:db8::1", 1), ("2001:db8::2", 1), ("::ffff:10.0.0.1", 1), ("10.0.0.2", 1), \
        ("10.0.0.3", 1)
    assert interleave([v4a, v4b, v6a, v4c, v6b, v4a]) == [v6a, v4a, v6b, v4b, v4c]
    assert interleave([v4b, v4a]) == [v4b, v4a]  # one family: the resolver's order
    assert interleave([v6b, v6a]) == [v6b, v6a]
    assert interleave([]) == []


def resolver(records: dict[str, list[str]]) -> Any:
    """A stand-in for the system resolver: the name's records, in the order a resolver returns them."""

    async def getaddrinfo(host: str, port: int, *, family: int, type: int) -> list[tuple[Any, ...]]:
        if host not in records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        result = []
        for address in records[host]:
            v6 = ":" in address
            if family == socket.AF_INET and v6:
                continue
            result.append((socket.AF_INET6 if v6 else socket.AF_INET, type, 17, "",
                           (address, port, 0, 0) if v6 else (address, port)))
        return result

    return getaddrinfo


def test_resolve_takes_every_address_and_both_record_types_in_rfc8305_order() -> None:
    lookup = resolver({"both.test": ["10.0.0.5", "2001:db8::5"], "v4.test": ["10.0.0.6"]})
    targets, problems = asyncio.run(resolve(
        [("both.test", 4433), ("192.0.2.1", 5000), ("v4.test", 4433), ("2001:db8::9", 6000)], socket.AF_INET6,
        lookup))
    assert targets == [("2001:db8::5", 4433), ("::ffff:10.0.0.5", 4433), ("2001:db8::9", 6000),
                       ("::ffff:192.0.2.1", 5000), ("::ffff:10.0.0.6", 4433)]
    assert problems == []


def test_resolve_on_an_ipv4_socket_says_why_an_address_gave_nothing() -> None:
    lookup = resolver({"v6only.test": ["2001:db8::5"]})
    targets, problems = asyncio.run(resolve(
        [("2001:db8::1", 1), ("v6only.test", 2), ("missing.test", 3), ("10.0.0.1", 4)], socket.AF_INET, lookup))
    assert targets == [("10.0.0.1", 4)]
    assert len(problems) == 3
    assert "IPv6 address" in problems[0] and "listen on [::]" in problems[0]
    assert "v6only.test has no address" in problems[1]
    assert problems[2].startswith("cannot resolve missing.test")


class Attempt:
    """One dial in a race: succeeds (True) or fails (False) ``after`` seconds, or never (None)."""

    def __init__(self, target: tuple[str, int], verdict: bool | None, after: float) -> None:
        self.target = target
        self.started = time.monotonic()
        self.verdict, self.after = verdict, after

    def outcome(self) -> bool | None:
        return self.verdict if time.monotonic() - self.started >= self.after else None


def run_race(plan: dict[str, tuple[bool | None, float]], timeout: float = 2.0, stagger: float = STAGGER
             ) -> tuple[Attempt | None, list[Attempt], float]:
    started: list[Attempt] = []

    def start(target: tuple[str, int]) -> Attempt:
        started.append(Attempt(target, *plan[target[0]]))
        return started[-1]

    begin = time.monotonic()
    winner = asyncio.run(race([(host, 1) for host in plan], start, Attempt.outcome, timeout=timeout, stagger=stagger))
    return winner, started, begin


def test_a_blackholed_first_address_costs_one_stagger() -> None:
    winner, started, begin = run_race({"2001:db8::1": (None, 0.0), "10.0.0.1": (True, 0.02)})
    assert winner is started[1] and winner.target == ("10.0.0.1", 1)
    assert STAGGER - 0.01 <= started[1].started - begin < STAGGER + 0.15


def test_a_failed_attempt_starts_the_next_at_once() -> None:
    winner, started, begin = run_race({"2001:db8::1": (False, 0.03), "10.0.0.1": (True, 0.0)})
    assert winner is started[1]
    assert started[1].started - begin < STAGGER / 2  # not a whole stagger after the first


def test_a_later_attempt_that_succeeds_first_wins_and_stops_the_race() -> None:
    winner, started, _ = run_race({"a::1": (True, 0.6), "10.0.0.1": (True, 0.05), "10.0.0.2": (True, 0.0)},
                                  stagger=0.1)
    assert winner is not None and winner.target == ("10.0.0.1", 1)  # started at 0.1 s, done at 0.15 s
    assert len(started) == 2  # the third address (due at 0.2 s) is never tried


@pytest.mark.parametrize("verdicts", [(False, False), (None, None)])
def test_no_winner_when_every_attempt_fails_or_the_timeout_passes(verdicts: tuple[bool | None, ...]) -> None:
    winner, started, begin = run_race({"a::1": (verdicts[0], 0.01), "10.0.0.1": (verdicts[1], 0.01)}, timeout=0.5)
    assert winner is None and len(started) == 2
    assert time.monotonic() - begin < 0.5 + 0.2


def test_no_targets_no_attempt() -> None:
    assert asyncio.run(race([], lambda target: target, lambda attempt: True, timeout=1.0)) is None
