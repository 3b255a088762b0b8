"""The NAT feature: observed addresses, and hole punching coordinated by a peer both sides reach.

- **Observed addresses.** When a peer's direct connection becomes ready, the node asks it ``OBSERVE``: the answer
  is the address that peer receives our packets from, i.e. our public mapping when a NAT is in between. Answers
  from several peers say whether our NAT keeps one mapping for every destination (endpoint-independent: hole
  punching can work) or not (status ``nat.mapping``, :func:`mapping`). Answers are shown and counted, never
  dialed.
- **Punching.** A node A that some peer sees at an address not its own (behind a NAT; a public node never
  punches: NATed peers reach it by their own dials) punches to a known peer B once a direct dial to B failed, or
  B was not reached directly for a second (at most 2 punches negotiated at once). A asks its direct peers,
  nearest first, ``PUNCH(B)``. A peer R connected directly to both (the rendezvous) sends B
  ``OFFER(A, A's address as R sees it)`` and answers A with B's address as R sees it; A and B then dial each other
  at once from their one UDP port. Each outgoing packet opens its sender's NAT for the other side's packets, so
  with endpoint-independent mapping on both sides the handshakes get through; the peer manager keeps one of the
  connections (the same tie-break as always; a direct one replaces a relayed one). Behind a NAT that maps each
  destination to a new port (symmetric) the dials fail quietly and the relayed path stays; punching is retried
  with a backoff (1 s doubling to 60 s).
- **Bounds.** Only verified peers can ask (feature requests come over their connections); punches asked of a
  rendezvous and offers received are token-bucketed per peer (``[nat] punch_rate``/``punch_burst``), and an
  offered or answered address is dialed only if it passes the policy: never loopback, multicast, link-local or
  unspecified, and private (non-global) ones only with ``[nat] dial_private = true``. Refusals are counted
  (status ``nat.counters``) and logged once per peer and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field

from quicmesh.errors import QuicmeshError
from quicmesh.nat.frame import (
    Observe,
    Offer,
    Punch,
    decode_address,
    decode_request,
    encode_address,
    encode_request,
    unmapped,
)
from quicmesh.protocol import wire
from quicmesh.protocol.addresses import format_address
from quicmesh.runtime.features import FeatureBase, FeatureHost

log = logging.getLogger("quicmesh.nat")

_TAG = int(wire.FeatureTag.NAT)
_TICK = 0.5  # seconds between looks for peers to punch to, while a known peer is not connected directly
_IDLE_TICK = 5.0  # ... while every one is
_RETRY_MIN, _RETRY_MAX = 1.0, 60.0  # after a punch attempt to a peer, wait this long before the next (doubling)
_ASKED = 4  # direct peers asked to be the rendezvous, nearest first
#: A peer not reached directly this long is punched to even before a dial to it failed (a dial into a NAT fails
#: only at timers.handshake_timeout): a few round trips, so a plain dial that works wins first.
_PUNCH_AFTER = 1.0
#: Punches in flight at once. Unbounded, a 32-node mesh started together punched to every peer its 8 dials in
#: flight had not reached within _PUNCH_AFTER: hundreds of extra handshakes, and convergence went from ~4 s to
#: ~40 s (quicmesh.bench.meshscale 32).
_MAX_PUNCHING = 2
_REQUEST_TIMEOUT = 3.0


def mapping(observed: list[tuple[str, int]]) -> str:
    """What the addresses our peers see us at (one per peer) say about our NAT (docs/NAT.md)."""
    seen = set(observed)
    if len(observed) < 2:
        return "unknown"
    if len(seen) == 1:
        return "endpoint-independent"
    if len({ip for ip, _ in seen}) == 1:
        return "endpoint-dependent"  # one public IP, a port per destination: a symmetric NAT
    return "several"  # peers see us at different IPs: we reach them through different networks


class NatRefusedError(QuicmeshError):
    """A peer asked for something the NAT feature does not do for it (the message says why)."""


@dataclass
class _Bucket:
    """Requests one peer may make per second (a token bucket)."""

    tokens: float
    at: float

    def take(self, rate: float, burst: int, now: float) -> bool:
        if rate <= 0:
            return True
        self.tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class NatCounters:
    observed_reports: int = 0  # OBSERVE answers taken
    bogus_reports: int = 0  # OBSERVE answers that were malformed or no usable address
    observe_answered: int = 0  # OBSERVE requests answered (as the observer)
    punches_started: int = 0  # punches this node dialed after a rendezvous answered
    punches_direct: int = 0  # ... after which the peer was connected directly
    punch_attempts_failed: int = 0  # no rendezvous could help (each refusal is in ``errors``)
    offers_accepted: int = 0  # OFFERs this node dialed for
    rendezvous_served: int = 0  # punches this node coordinated for two others
    refused_rate: int = 0  # PUNCH or OFFER over the per-peer rate
    refused_policy: int = 0  # an address outside the dial policy ([nat] dial_private, never loopback...)
    refused_other: int = 0  # everything else (not connected to the target, unknown peer, punching off...)
    errors: dict[str, str] = field(default_factory=dict)  # peer -> why the last punch attempt to it failed


class NatFeature(FeatureBase):
    feature_tags = frozenset({_TAG})

    def __init__(self, host: FeatureHost) -> None:
        self._host = host
        self._observed: dict[str, tuple[str, int]] = {}  # peer -> our address as that peer sees it
        self._translated: dict[str, bool] = {}  # peer -> it sees us at an address that is not ours (a NAT)
        self._attempting: set[str] = set()
        self._retry: dict[str, tuple[float, float]] = {}  # peer -> (no punch before, next wait)
        self._punched: dict[str, float] = {}  # peer -> when we last dialed it for a punch (not yet direct)
        self._unreached: dict[str, float] = {}  # peer -> since when it has not been reached directly
        self._started = 0.0
        self._buckets: dict[str, _Bucket] = {}
        self._logged: set[tuple[str, str]] = set()  # (peer, reason) refusals already logged
        self._wake = asyncio.Event()
        self.counters = NatCounters()

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = time.monotonic()  # every peer is unreached from here (the first dials start now)
        self._host.spawn(self._watch())

    async def _watch(self) -> None:
        """Look for peers to punch to every 0.5 s while a configured peer is not reached directly, every 5 s
        otherwise (a reload may add one), and at once when a peer is lost. Ends with the node (its task)."""
        while self._host.running:
            direct = self._host.direct_peers()
            self._consider_punching(direct)
            everyone = {peer.name for peer in self._host.config.peers} <= set(direct)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _IDLE_TICK if everyone else _TICK)

    # --- the seam -------------------------------------------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        if peer not in self._host.direct_peers():
            return
        self._retry.pop(peer, None)  # reached directly: a later loss starts a fresh backoff
        self.counters.errors.pop(peer, None)
        if self._punched.pop(peer, None) is not None:
            self.counters.punches_direct += 1
            log.info("connected to %s directly after hole punching", peer, extra={"event": "nat_direct", "peer": peer})
        self._host.spawn(self._observe(peer))

    def peer_lost(self, peer: str, reason: str) -> None:
        self._observed.pop(peer, None)
        self._translated.pop(peer, None)
        self._unreached[peer] = time.monotonic()
        self._wake.set()

    def request_received(self, peer: str, tag: int, data: bytes) -> Awaitable[bytes] | bytes:
        request = decode_request(data)
        if isinstance(request, Observe):
            return self._answer_observe(peer)
        if isinstance(request, Punch):
            return self._rendezvous(peer, request.target)
        return self._offered(peer, request)

    # --- observed addresses ---------------------------------------------------------------------------
    async def _observe(self, peer: str) -> None:
        try:
            answer = await self._host.request(peer, _TAG, encode_request(Observe()), timeout=_REQUEST_TIMEOUT)
        except QuicmeshError as error:  # an older node, rendezvous off, gone: nothing learnt
            log.debug("%s did not say where it sees us: %s", peer, error)
            return
        try:
            address = decode_address(answer)
            ip = ipaddress.ip_address(address[0])
            if ip.is_unspecified or ip.is_multicast:
                raise QuicmeshError(f"{address[0]} is no address a peer can see us at")
        except QuicmeshError as error:
            self.counters.bogus_reports += 1
            self._log_refusal(peer, f"bogus observed-address report from {peer}: {error}")
            return
        self.counters.observed_reports += 1
        if self._observed.get(peer) != address:
            log.info("%s sees this node at %s", peer, format_address(address))
        self._observed[peer] = address
        self._translated[peer] = not self._is_ours(address)

    def _is_ours(self, address: tuple[str, int]) -> bool:
        """Whether a peer sees us at our own address and port (no NAT between us), tested by binding to the IP:
        only a local address can be bound."""
        listen = self._host.listen_address
        if listen is None or address[1] != listen[1]:
            return False
        ip = unmapped(ipaddress.ip_address(address[0]))
        try:
            with socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                probe.bind((str(ip), 0))
        except OSError:
            return False
        return True

    def _answer_observe(self, peer: str) -> bytes:
        if not self._host.config.nat.rendezvous:
            raise self._refuse(peer, "other", f"{self._host.node_name} reports no addresses ([nat] rendezvous = false)")
        address = self._host.observed_address(peer)
        if address is None:
            raise self._refuse(peer, "other", f"{self._host.node_name} has no direct connection to {peer}")
        self.counters.observe_answered += 1
        return encode_address(address)

    # --- punching, as the node that wants a direct path ---------------------------------------------------
    def _consider_punching(self, direct: dict[str, float | None]) -> None:
        # Only a node that peers see at an address not its own needs punching: any other is reached by the
        # peer's own dial (a mesh of public nodes started at once must not punch to every peer it has not
        # dialed yet).
        if not self._host.config.nat.punch or not any(self._translated.values()):
            return
        now = time.monotonic()
        for target in list(self._unreached):
            if target in direct:
                del self._unreached[target]
        for peer in self._host.config.peers:
            target = peer.name
            if target in direct or target in self._attempting or now < self._retry.get(target, (0.0, 0.0))[0]:
                continue
            since = self._unreached.setdefault(target, self._started)
            if not self._host.direct_failures(target) and now - since < _PUNCH_AFTER:
                continue  # the plain dial may well work: give it a moment (it fails only after handshake_timeout)
            if not any(name != target for name in direct):
                continue  # nobody to coordinate through
            if len(self._attempting) >= _MAX_PUNCHING:
                break  # the next tick goes on
            self._attempting.add(target)
            self._host.spawn(self._punch(target))

    async def _punch(self, target: str) -> None:
        try:
            reason = await self._try_rendezvous(target)
        finally:
            self._attempting.discard(target)
        self._back_off(target)
        if reason is None:
            return
        self.counters.punch_attempts_failed += 1
        if self.counters.errors.get(target) != reason:
            log.info("cannot punch a direct path to %s: %s", target, reason)
        self.counters.errors[target] = reason

    def _back_off(self, target: str) -> None:
        wait = self._retry.get(target, (0.0, _RETRY_MIN))[1]
        self._retry[target] = (time.monotonic() + wait, min(_RETRY_MAX, wait * 2))

    async def _try_rendezvous(self, target: str) -> str | None:
        """Ask direct peers, nearest first, to coordinate a punch to ``target``; None once one did."""
        direct = {name: rtt for name, rtt in self._host.direct_peers().items() if name != target}
        refusals = []
        for rendezvous in sorted(direct, key=lambda name: direct[name] or 0.0)[:_ASKED]:
            try:
                answer = await self._host.request(rendezvous, _TAG, encode_request(Punch(target)),
                                                  timeout=_REQUEST_TIMEOUT)
                address = decode_address(answer)
            except QuicmeshError as error:
                refusals.append(f"{rendezvous}: {error}")
                continue
            problem = self._policy(address)
            if problem is not None:
                self.counters.refused_policy += 1
                refusals.append(f"{rendezvous} answered {format_address(address)}: {problem}")
                continue
            log.info("punching to %s at %s (rendezvous %s)", target, format_address(address), rendezvous, extra={
                "event": "nat_punch", "peer": target, "address": format_address(address), "rendezvous": rendezvous})
            self._dial(target, address)
            return None
        return "; ".join(refusals) or "no direct peer to coordinate through"

    def _dial(self, target: str, address: tuple[str, int]) -> None:
        self.counters.punches_started += 1
        self._punched[target] = time.monotonic()
        self._host.dial_address(address, expect=target)

    # --- as the rendezvous ----------------------------------------------------------------------------
    async def _rendezvous(self, source: str, target: str) -> bytes:
        config = self._host.config.nat
        me = self._host.node_name
        if not config.rendezvous:
            raise self._refuse(source, "other", f"{me} coordinates no punches ([nat] rendezvous = false)")
        if not self._take(source):
            raise self._refuse(source, "rate", f"{source} asks {me} for punches too often ([nat] punch_rate)")
        if target in (source, me):
            raise self._refuse(source, "other", f"a punch from {source} to {target} through {me} is a loop")
        source_address, target_address = self._host.observed_address(source), self._host.observed_address(target)
        if source_address is None or target_address is None:
            missing = source if source_address is None else target
            raise self._refuse(source, "other", f"{me} has no direct connection to {missing}")
        try:
            await self._host.request(target, _TAG, encode_request(Offer(source, source_address)),
                                     timeout=_REQUEST_TIMEOUT)
        except QuicmeshError as error:
            raise NatRefusedError(f"{target} declined: {error}") from None
        self.counters.rendezvous_served += 1
        log.info("coordinated a punch %s (%s) <-> %s (%s)", source, format_address(source_address), target,
                 format_address(target_address))
        return encode_address(target_address)

    # --- as the target ----------------------------------------------------------------------------------
    def _offered(self, rendezvous: str, offer: Offer) -> bytes:
        config = self._host.config
        me = self._host.node_name
        if not config.nat.punch:
            raise self._refuse(rendezvous, "other", f"{me} does not punch ([nat] punch = false)")
        if not self._take(rendezvous):
            raise self._refuse(rendezvous, "rate", f"{rendezvous} offers {me} punches too often ([nat] punch_rate)")
        if config.peer(offer.source) is None or offer.source in (me, rendezvous):
            raise self._refuse(rendezvous, "other", f"{offer.source} is not a peer {me} punches to")
        if offer.source in self._host.direct_peers():
            raise self._refuse(rendezvous, "other", f"{me} is already connected to {offer.source} directly")
        problem = self._policy(offer.address)
        if problem is not None:
            raise self._refuse(rendezvous, "policy", f"{format_address(offer.address)}: {problem}")
        self.counters.offers_accepted += 1
        log.info("punching to %s at %s (offered by %s)", offer.source, format_address(offer.address), rendezvous,
                 extra={"event": "nat_punch", "peer": offer.source, "address": format_address(offer.address),
                        "rendezvous": rendezvous})
        self._back_off(offer.source)  # this is our attempt too: no second one of our own meanwhile
        self._dial(offer.source, offer.address)
        return b""

    # --- bounds ---------------------------------------------------------------------------------------
    def _policy(self, address: tuple[str, int]) -> str | None:
        """Why ``address`` must not be dialed because a peer named it, or None."""
        ip = unmapped(ipaddress.ip_address(address[0]))
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
            return "loopback, multicast, link-local and unspecified addresses are never dialed"
        if not ip.is_global and not self._host.config.nat.dial_private:
            return "a private address, dialed only with [nat] dial_private = true"
        return None

    def _take(self, peer: str) -> bool:
        config, now = self._host.config.nat, time.monotonic()
        bucket = self._buckets.setdefault(peer, _Bucket(float(config.punch_burst), now))
        return bucket.take(config.punch_rate, config.punch_burst, now)

    def _refuse(self, peer: str, kind: str, reason: str) -> NatRefusedError:
        counter = f"refused_{kind}"
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        self._log_refusal(peer, reason)
        return NatRefusedError(reason)

    def _log_refusal(self, peer: str, reason: str) -> None:
        if (peer, reason) not in self._logged and len(self._logged) < 1024:
            self._logged.add((peer, reason))
            log.warning("%s", reason, extra={"event": "nat_refused", "peer": peer})

    # --- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        public = Counter(format_address(address) for address in self._observed.values())
        return {
            "observed": {peer: format_address(address) for peer, address in sorted(self._observed.items())},
            "public": [address for address, _ in public.most_common()],
            "mapping": mapping(list(self._observed.values())),
            "behind_nat": any(self._translated.values()),  # some peer sees us at an address not ours
            "counters": {key: value for key, value in vars(self.counters).items() if key != "errors"},
            "errors": dict(self.counters.errors),
        }
