"""Where to dial a peer, and in which order: the Happy Eyeballs way (RFC 8305).

A peer may have several addresses (its config, what it announced) and a DNS name may have A and AAAA records.
Every one becomes a socket address the node's one UDP socket can send to (an IPv4 peer on a dual-stack ``[::]``
socket as ``::ffff:a.b.c.d``; an IPv6 one cannot be reached from an IPv4 socket), ordered IPv6 first, then the
families alternating, each family in the resolver's order (RFC 8305 section 4). Connections then races them: an
attempt at the first, the next one ``STAGGER`` later or as soon as every started attempt failed (section 5), and
the first handshake to complete wins; the others are closed. A blackholed family thus costs one stagger, not a
handshake timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

#: RFC 8305's recommended Connection Attempt Delay: the next address is tried this long after the previous one
STAGGER = 0.25
_POLL = 0.01  # seconds between looks at the running attempts while racing

Target = tuple[str, int]
A = TypeVar("A")
Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]


def sendable(host: str, port: int, family: int) -> Target | None:
    """``(host, port)`` ready for sendto on a socket of ``family`` if host is an IP literal, mapping IPv4 onto a
    dual-stack socket; None if it is a name, or an IPv6 address an IPv4 socket cannot reach."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if family == socket.AF_INET6 and ip.version == 4:
        return (f"::ffff:{ip}", port)
    if family == socket.AF_INET and ip.version == 6:
        return None
    return (str(ip), port)


def is_ipv6(target: Target) -> bool:
    """An IPv6 destination (not an IPv4 one written as ``::ffff:a.b.c.d``)."""
    ip = ipaddress.ip_address(target[0])
    return ip.version == 6 and ip.ipv4_mapped is None  # type: ignore[union-attr]


def interleave(targets: Sequence[Target]) -> list[Target]:
    """RFC 8305 section 4: duplicates dropped, IPv6 first, then alternating families, each family in order."""
    unique = list(dict.fromkeys(targets))
    families = [[t for t in unique if is_ipv6(t)], [t for t in unique if not is_ipv6(t)]]
    if not families[0]:
        return families[1]
    ordered = []
    for index in range(max(len(families[0]), len(families[1]))):
        ordered += [family[index] for family in families if index < len(family)]
    return ordered


async def resolve(addresses: Sequence[Target], family: int, getaddrinfo: Resolver | None = None
                  ) -> tuple[list[Target], list[str]]:
    """Every socket address of ``addresses`` (IP literals and DNS names, A and AAAA) that a socket of ``family``
    can send to, in the order to try them; and why those that gave none did not."""
    lookup = getaddrinfo or asyncio.get_running_loop().getaddrinfo
    found: list[Target] = []
    problems: list[str] = []
    for host, port in addresses:
        literal = sendable(host, port, family)
        if literal is not None:
            found.append(literal)
            continue
        if _is_ip(host):
            problems.append(f"{host}: an IPv6 address, and this node's socket is IPv4 (listen on [::] for both)")
            continue
        try:
            infos = await lookup(host, port, family=socket.AF_UNSPEC if family == socket.AF_INET6 else family,
                                 type=socket.SOCK_DGRAM)
        except OSError as error:
            problems.append(f"cannot resolve {host}: {error}")
            continue
        usable = [t for t in (sendable(info[4][0], info[4][1], family) for info in infos) if t is not None]
        if not usable:
            problems.append(f"{host} has no address this node's socket can reach")
        found += usable
    return interleave(found), problems


async def race(targets: Sequence[Target], start: Callable[[Target], A], outcome: Callable[[A], bool | None], *,
               timeout: float, stagger: float = STAGGER) -> A | None:
    """Start an attempt at each target in turn: the next ``stagger`` after the previous one, or at once when
    every started attempt failed. The first whose ``outcome`` is True wins; None if all failed (False) or none
    succeeded within ``timeout``. Attempts still running afterwards are the caller's to end."""
    attempts: list[A] = []
    deadline = time.monotonic() + timeout
    next_start = 0.0
    while True:
        now = time.monotonic()
        results = [outcome(attempt) for attempt in attempts]
        for attempt, result in zip(attempts, results):
            if result:
                return attempt
        every_started_failed = all(result is False for result in results)
        if len(attempts) < len(targets) and (now >= next_start or every_started_failed):
            attempts.append(start(targets[len(attempts)]))
            next_start = now + stagger
            continue
        if (every_started_failed and len(attempts) == len(targets)) or now >= deadline:
            return None
        await asyncio.sleep(_POLL)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
