"""Keeping strangers cheap to ignore: source allowlist, handshake rate limits, pending-handshake cap, Retry.

Pure logic, no socket and no clock of its own (every call takes ``now``), so it is tested without a network.
The endpoint (quicmesh/transport.py) asks it two questions:

* :meth:`Guard.allowed` for EVERY received packet, before aioquic sees it: is the source inside the
  allowlist? The answer is cached per source address (a bounded dict), so a flood costs one dict lookup.
* :meth:`Guard.admit_initial` for a packet that would create a NEW server connection: per-source and
  global token buckets, and the cap on handshakes that have not completed yet. With ``retry`` on, the
  Initial then goes through :meth:`Guard.retry_check` (QUIC Retry address validation, RFC 9000 8.1, done the
  way aioquic's own ``QuicServer`` does it with its public ``QuicRetryTokenHandler``).

Every drop is counted by reason in :attr:`Guard.counters` (status ``guard`` field, metrics).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aioquic.quic.packet import QuicHeader, encode_quic_retry
from aioquic.quic.retry import QuicRetryTokenHandler

log = logging.getLogger("quicmesh.guard")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Counter names, in display order. Drops are everything but ``retry_sent``.
COUNTERS = (
    "not_allowed",         # source outside the allowlist (any packet)
    "rate_source",         # new-connection Initial over the per-source handshake budget
    "rate_global",         # new-connection Initial over the node-wide handshake budget
    "pending_full",        # new-connection Initial while max_pending_handshakes are in progress
    "retry_sent",          # Retry packets sent (not a drop: the client must come back with the token)
    "retry_invalid",       # Initial with a bad, expired or foreign Retry token
)
DROP_COUNTERS = tuple(name for name in COUNTERS if name != "retry_sent")

#: Bounds on per-source state, so a spoofed-source flood cannot grow memory.
MAX_CACHED_SOURCES = 4096
MAX_BUCKETS = 4096


def parse_network(text: str) -> Network:
    """``"10.0.0.0/8"``, ``"192.0.2.7"`` (a /32) or ``"2001:db8::/32"``; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"must be a CIDR string such as \"10.0.0.0/8\", got {text!r}")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR network: {text!r}") from None


def host_network(host: str) -> Network | None:
    """The single-address network of an IP literal (IPv4-mapped IPv6 as IPv4); None for a DNS name."""
    address = _address(host)
    return None if address is None else ipaddress.ip_network(address)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 sources as ::ffff:a.b.c.d
    return address


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; ``take(now)`` spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True)
class GuardSettings:
    """What the guard enforces; 0 for a rate or a cap turns that check off."""

    allowlist: tuple[Network, ...] | None = None  # None: every source may talk to us
    handshake_rate_per_source: float = 0.0
    handshake_burst_per_source: int = 0
    handshake_rate: float = 0.0
    handshake_burst: int = 0
    max_pending_handshakes: int = 0
    retry: bool = False


class Guard:
    def __init__(self, settings: GuardSettings, now: float = 0.0) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._allow_cache: dict[str, bool] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._retry: QuicRetryTokenHandler | None = None
        self.settings = settings
        self._global: TokenBucket | None = None
        self.configure(settings, now)

    def configure(self, settings: GuardSettings, now: float = 0.0) -> None:
        """Apply new settings (reload): caches and buckets start over, counters are kept."""
        self.settings = settings
        self._allow_cache.clear()
        self._buckets.clear()
        self._global = (
            TokenBucket(settings.handshake_rate, max(1, settings.handshake_burst), now)
            if settings.handshake_rate > 0 else None
        )
        if settings.retry and self._retry is None:
            self._retry = QuicRetryTokenHandler()
        elif not settings.retry:
            self._retry = None

    @property
    def retry(self) -> bool:
        return self._retry is not None

    @property
    def active(self) -> bool:
        """Whether the guard checks anything at all (the endpoint skips it otherwise)."""
        s = self.settings
        return bool(s.allowlist is not None or s.handshake_rate_per_source > 0 or s.handshake_rate > 0
                    or s.max_pending_handshakes > 0 or s.retry)

    # --- every packet --------------------------------------------------------------------------
    def allowed(self, host: str) -> bool:
        """Is this source address inside the allowlist? Cached per address; counts ``not_allowed``."""
        allowlist = self.settings.allowlist
        if allowlist is None:
            return True
        verdict = self._allow_cache.get(host)
        if verdict is None:
            address = _address(host)
            verdict = address is not None and any(
                address.version == network.version and address in network for network in allowlist
            )
            if len(self._allow_cache) >= MAX_CACHED_SOURCES:
                self._allow_cache.clear()
            self._allow_cache[host] = verdict
        if not verdict:
            self.counters["not_allowed"] += 1
        return verdict

    # --- new-connection Initials -----------------------------------------------------------------
    def admit_initial(self, host: str, now: float, pending: int) -> bool:
        """May an Initial for an unknown connection from ``host`` start a handshake? Counts the drop."""
        s = self.settings
        if s.max_pending_handshakes > 0 and pending >= s.max_pending_handshakes:
            self.counters["pending_full"] += 1
            return False
        if s.handshake_rate_per_source > 0:
            bucket = self._buckets.get(host)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._evict(now)
                bucket = self._buckets[host] = TokenBucket(
                    s.handshake_rate_per_source, max(1, s.handshake_burst_per_source), now
                )
            if not bucket.take(now):
                self.counters["rate_source"] += 1
                return False
        if self._global is not None and not self._global.take(now):
            self.counters["rate_global"] += 1
            return False
        return True

    def _evict(self, now: float) -> None:
        """Forget refilled buckets (they hold no information); if none, the oldest half."""
        for host in [host for host, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[host]
        if len(self._buckets) >= MAX_BUCKETS:
            for host in list(self._buckets)[: MAX_BUCKETS // 2]:
                del self._buckets[host]

    def retry_check(
        self, header: QuicHeader, addr: tuple[str, int], now: float
    ) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
        """With Retry on: ``(retry_packet, None)`` to send back for a token-less Initial, ``(None, None)``
        to drop one with a bad token, ``(None, (original_dcid, retry_scid))`` to accept a validated one."""
        assert self._retry is not None
        if not header.token:
            source_cid = os.urandom(8)
            packet = encode_quic_retry(
                version=header.version,
                source_cid=source_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=self._retry.create_token(
                    address=addr,
                    original_destination_connection_id=header.destination_cid,
                    retry_source_connection_id=source_cid,
                    now=now,
                ),
            )
            self.counters["retry_sent"] += 1
            return packet, None
        try:
            original = self._retry.validate_token(
                address=addr, destination_cid=header.destination_cid, token=header.token, now=now
            )
        except ValueError:
            self.counters["retry_invalid"] += 1
            return None, None
        return None, (original, header.destination_cid)

    def status(self) -> dict[str, object]:
        """JSON-ready: the counters plus what is enforced."""
        s = self.settings
        return {
            "allowlist": None if s.allowlist is None else [str(n) for n in s.allowlist],
            "retry": s.retry,
            "max_pending_handshakes": s.max_pending_handshakes,
            "dropped": sum(self.counters[name] for name in DROP_COUNTERS),
            "counters": dict(self.counters),
        }


def networks(items: Iterable[str]) -> tuple[Network, ...]:
    return tuple(parse_network(item) for item in items)


async def settings_for(config: Any, *, resolve_timeout: float = 2.0) -> GuardSettings:
    """GuardSettings from a Config's ``[security]``; with ``allowlist_peers``, the peers' addresses are
    resolved now (DNS names too: every address they resolve to). A name that does not resolve is logged and
    left out: that peer can still be dialed by us, but cannot open a connection to us until the next reload."""
    security = config.security
    allowlist: list[Network] | None = None
    if security.allowlist is not None or security.allowlist_peers:
        allowlist = [parse_network(item) for item in security.allowlist or ()]
    if security.allowlist_peers and allowlist is not None:
        loop = asyncio.get_running_loop()

        async def resolve(peer: Any) -> list[Network]:
            network = host_network(peer.address.host)
            if network is not None:
                return [network]
            try:
                async with asyncio.timeout(resolve_timeout):
                    infos = await loop.getaddrinfo(peer.address.host, peer.address.port, type=socket.SOCK_DGRAM)
            except (OSError, TimeoutError) as error:
                log.warning("security.allowlist_peers: cannot resolve peer %s (%s): %s",
                            peer.name, peer.address.host, error)
                return []
            return [n for n in (host_network(str(info[4][0])) for info in infos) if n is not None]

        for found in await asyncio.gather(*(resolve(peer) for peer in config.peers)):  # at once: one timeout
            allowlist.extend(found)
    return GuardSettings(
        allowlist=None if allowlist is None else tuple(dict.fromkeys(allowlist)),
        handshake_rate_per_source=security.handshake_rate_per_source,
        handshake_burst_per_source=security.handshake_burst_per_source,
        handshake_rate=security.handshake_rate,
        handshake_burst=security.handshake_burst,
        max_pending_handshakes=security.max_pending_handshakes,
        retry=security.retry,
    )
