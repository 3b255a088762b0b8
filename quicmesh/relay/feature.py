"""The relay feature: circuits through a third node, and the choice of when and through whom to use one.

Roles, in one class because every node may play each of them:
- **relay** (B): accepts ``Connect(target)`` from an end node A, asks C with ``Offer(A, circuit)``, then
  forwards RELAY_UP datagrams of either end to the other as RELAY_DOWN, bytes untouched; refuses loops, chains
  (C must be a *direct* peer of B), peers not allowed, and circuits over budget, each with a reason.
- **end** (A or C): a circuit is a :class:`CircuitPath` given to the endpoint, so the inner connection is an
  ordinary Connection that the peer manager keeps or replaces (a direct one always wins);
- **chooser**: once the direct dial to a peer has failed, a node asks its nearest direct peers whom they reach
  directly (``Reach``, with RTTs: asked only then, so a healthy mesh spends nothing on it), opens a circuit
  through the one with the lowest sum of RTTs (near-equals chosen at random, to spread load), falling back to
  the next on a refusal, and keeps probing the direct path, which replaces the relayed one when it heals.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from quicmesh.errors import QuicmeshError
from quicmesh.protocol import wire
from quicmesh.protocol.wire.relay import Close, Connect, Offer, Reach, decode_relay_message, encode_relay_message
from quicmesh.runtime.datagrams import DATAGRAM_PACKET_OVERHEAD
from quicmesh.runtime.features import FeatureBase, FeatureHost

log = logging.getLogger("quicmesh.relay")

_UP, _DOWN = int(wire.DatagramKind.RELAY_UP), int(wire.DatagramKind.RELAY_DOWN)
_TAG = int(wire.FeatureTag.RELAY)
_TICK = 0.25  # seconds between looks for peers to reach through a relay, while one is not connected
_IDLE_TICK = 5.0  # ... while every configured peer is
_RETRY_MIN, _RETRY_MAX = 1.0, 30.0  # after a failed attempt to relay to a peer, wait this long (doubling)
_ASKED = 8  # direct peers asked whom they reach, nearest first
_UNUSED_PATH = 30.0  # seconds an offered or opened circuit may wait for its first packet
_SECOND_SIDE_AFTER = 3  # failed direct dials after which the node that sorts second tries a relay too
#: The outer connections must carry a relayed QUIC packet (1,200 bytes) plus the relay header.
MIN_OUTER_PAYLOAD = 1200 + wire.RELAY_HEADER_MAX


class RelayRefusedError(QuicmeshError):
    """A relay, or the far end, refused a circuit (the message says who and why)."""


@dataclass(eq=False)
class CircuitPath:
    """One end of a circuit: where the inner connection's packets go (transport.endpoint.RelayPath)."""

    relay: str
    circuit: int
    expected_peer: str
    owner: RelayFeature
    created: float = field(default_factory=time.monotonic)
    packets_in: int = 0  # a path that never carried a packet is dropped after _UNUSED_PATH seconds

    @property
    def address(self) -> tuple[str, int]:
        return (f"via-{self.relay}", self.circuit)

    def send(self, packet: bytes) -> None:
        self.owner.send_up(self, packet)

    def closed(self) -> None:
        self.owner.path_closed(self)


@dataclass(eq=False)
class _Circuit:
    """A circuit through this node (as the relay)."""

    circuit: int
    a: str  # the end that asked
    c: str  # the end it asked for
    bytes_relayed: int = 0


@dataclass
class _Bucket:
    """Bytes per second one peer may send through this node (a token bucket, one second deep)."""

    tokens: float = 0.0
    at: float = 0.0

    def take(self, size: int, rate: float, now: float) -> bool:
        if rate <= 0:
            return True
        self.tokens = min(rate, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < size:
            return False
        self.tokens -= size
        return True


@dataclass
class RelayCounters:
    circuits_opened: int = 0
    circuits_refused: int = 0
    packets_relayed: int = 0
    bytes_relayed: int = 0
    dropped_over_budget: int = 0
    dropped_unknown_circuit: int = 0
    dropped_queue_full: int = 0
    attempts: int = 0
    attempts_failed: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # peer -> why our last attempt to relay to it failed


class RelayFeature(FeatureBase):
    datagram_kinds = frozenset({_UP, _DOWN})
    feature_tags = frozenset({_TAG})

    def __init__(self, host: FeatureHost, rng: random.Random | None = None) -> None:
        self._host = host
        self._rng = rng or random.Random()
        self._circuits: dict[int, _Circuit] = {}  # as the relay, by circuit id (ours)
        self._next_circuit = 1
        self._buckets: dict[str, _Bucket] = {}
        self._paths: dict[tuple[str, int], CircuitPath] = {}  # as an end, by (relay, circuit id)
        self._attempting: set[str] = set()  # targets with an attempt under way
        self._retry: dict[str, tuple[float, float]] = {}  # target -> (not before, next wait) after failures
        self._timer: asyncio.TimerHandle | None = None
        self.counters = RelayCounters()

    # --- lifecycle: the node calls these ---------------------------------------------------------
    def start(self) -> None:
        self._schedule(_TICK)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        """Every 0.25 s while a configured peer is not connected; every 5 s otherwise (a reload may add one),
        so a healthy idle mesh is not woken four times a second per node for nothing."""
        self._timer = None
        if not self._host.running:
            return
        self._drop_unused_paths()
        self._consider_relaying()
        everyone = {peer.name for peer in self._host.config.peers} <= set(self._host.connected_peers())
        self._schedule(_IDLE_TICK if everyone else _TICK)

    # --- as an end: choosing and opening circuits -------------------------------------------------
    def _consider_relaying(self) -> None:
        if not self._host.config.relay.use:
            return
        now = time.monotonic()
        connected = set(self._host.connected_peers())
        me = self._host.node_name
        for peer in self._host.config.peers:
            target = peer.name
            if target in connected:
                self._retry.pop(target, None)  # reached (directly or not): a later loss starts a fresh backoff
                continue
            if target in self._attempting or now < self._retry.get(target, (0.0, 0.0))[0]:
                continue
            failures = self._host.direct_failures(target)
            # Once a direct dial failed. The node whose name sorts first goes first, as its relayed connection is
            # the one both keep; the other follows if that does not come (its relays may differ, or it may not use any).
            if not failures or (me > target and failures < _SECOND_SIDE_AFTER):
                continue
            self._attempting.add(target)
            self._host.spawn(self._reach_through_relay(target))

    async def _reach_through_relay(self, target: str) -> None:
        try:
            reason = await self._try_relays(target)
        finally:
            self._attempting.discard(target)
        wait = self._retry.get(target, (0.0, _RETRY_MIN))[1]
        if reason is None:
            # Dialing through the relay: the handshake has its time, and if it fails (a relay that tampers, an end
            # that refuses) the next attempt backs off further; reaching the peer resets the backoff.
            wait = max(wait, self._host.config.timers.handshake_timeout)
            self._retry[target] = (time.monotonic() + wait, min(_RETRY_MAX, wait * 2))
            self.counters.errors.pop(target, None)
            return
        self.counters.attempts_failed += 1
        self._retry[target] = (time.monotonic() + wait, min(_RETRY_MAX, wait * 2))
        if self.counters.errors.get(target) != reason:
            log.warning("cannot reach %s through a relay: %s", target, reason)
        self.counters.errors[target] = reason

    async def _try_relays(self, target: str) -> str | None:
        """Open a circuit to ``target`` through the best relay and dial through it: None, or why not."""
        self.counters.attempts += 1
        direct = {name: rtt for name, rtt in self._host.direct_peers().items() if name != target}
        if not direct:
            return "no peer is connected directly to relay through"
        nearest = sorted(direct, key=lambda name: direct[name] or 0.0)[:_ASKED]
        answers = await asyncio.gather(*(self._ask_reach(relay) for relay in nearest))
        scored, refusals = [], []
        for relay, reach in zip(nearest, answers):
            if reach is None or target not in reach:
                continue
            if self._sure_limit(relay) < MIN_OUTER_PAYLOAD:
                refusals.append(f"{relay}: the connection to it carries datagrams of at most "
                                f"{self._sure_limit(relay)} bytes, relaying needs {MIN_OUTER_PAYLOAD} "
                                f"(raise limits.max_datagram_size to 1452)")
                continue
            scored.append(((direct[relay] or 0.0) * 1e6 + reach[target], relay))
        if not scored:
            return "; ".join(refusals) or f"none of {', '.join(nearest)} reaches {target} directly"
        for relay in self._by_preference(scored):
            try:
                answer = await self._host.request(relay, _TAG, encode_relay_message(Connect(target)), timeout=5.0)
                circuit, end = wire.decode_varint(answer) or (-1, 0)
                if circuit < 0 or end != len(answer) or circuit > wire.MAX_CIRCUIT_ID:
                    raise RelayRefusedError(f"relay {relay} answered with a malformed circuit id")
            except QuicmeshError as error:
                refusals.append(f"{relay}: {error}")
                continue
            path = CircuitPath(relay, circuit, target, self)
            self._paths[(relay, circuit)] = path
            log.info("reaching %s through relay %s (circuit %d)", target, relay, circuit)
            self._host.dial_relayed(target, path)
            return None
        return "refused by " + "; ".join(refusals)

    def _by_preference(self, scored: list[tuple[float, str]]) -> list[str]:
        """Best first; relays within 20 % (+200 us) of the best come first in random order (spreads load)."""
        best = min(score for score, _ in scored)
        near = [relay for score, relay in scored if score <= best * 1.2 + 200]
        self._rng.shuffle(near)
        return near + [relay for _, relay in sorted(scored) if relay not in near]

    async def _ask_reach(self, relay: str) -> dict[str, int] | None:
        try:
            answer = await self._host.request(relay, _TAG, encode_relay_message(Reach(())), timeout=2.0)
            message = decode_relay_message(answer)
        except QuicmeshError:
            return None
        return dict(message.peers) if isinstance(message, Reach) else None

    def send_up(self, path: CircuitPath, packet: bytes) -> None:
        datagram = wire.encode_relay_datagram(wire.DatagramKind.RELAY_UP, path.circuit, packet)
        self._host.send_datagram(path.relay, datagram, len(packet))

    def path_closed(self, path: CircuitPath) -> None:
        """The inner connection ended: tell the relay, which tells the other end."""
        if self._paths.pop((path.relay, path.circuit), None) is None or not self._host.running:
            return
        self._send(path.relay, Close(path.circuit, "connection closed", up=True))

    # --- the seam ---------------------------------------------------------------------------------
    def peer_lost(self, peer: str, reason: str) -> None:
        if self._host.running:
            self._schedule(_TICK)  # it may have to be reached through a relay now
        for circuit in [c for c in self._circuits.values() if peer in (c.a, c.c)]:
            self._drop_circuit(circuit, f"{peer} is gone: {reason}", notify=True)

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        kind, circuit, packet = wire.decode_relay_datagram(datagram)
        if kind == _DOWN:
            path = self._paths.get((peer, circuit))
            if path is None:
                self.counters.dropped_unknown_circuit += 1
                return
            path.packets_in += 1
            self._host.relayed_packet(path, packet)
            return
        relayed = self._circuits.get(circuit)
        if relayed is None or peer not in (relayed.a, relayed.c):
            self.counters.dropped_unknown_circuit += 1
            return
        size = len(packet)
        rate, now = self._host.config.relay.max_bytes_per_second, time.monotonic()
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(tokens=rate, at=now)
        if not bucket.take(size, rate, now):
            self.counters.dropped_over_budget += 1
            return
        other = relayed.c if peer == relayed.a else relayed.a
        down = wire.encode_relay_datagram(wire.DatagramKind.RELAY_DOWN, circuit, packet)
        if self._host.send_datagram(other, down, size) is not None:
            self.counters.dropped_queue_full += 1
            return
        relayed.bytes_relayed += size
        self.counters.packets_relayed += 1
        self.counters.bytes_relayed += size

    def message_received(self, peer: str, tag: int, data: bytes) -> Awaitable[object] | None:
        message = decode_relay_message(data)
        if isinstance(message, Close) and message.up:  # to us as the relay
            relayed = self._circuits.get(message.circuit)
            if relayed is not None and peer in (relayed.a, relayed.c):
                self._drop_circuit(relayed, message.reason, notify=True, told_by=peer)
        elif isinstance(message, Close):  # to us as an end: the relay dropped our circuit
            self._paths.pop((peer, message.circuit), None)
        else:
            raise RelayRefusedError(f"{type(message).__name__} is a request, not a message")
        return None

    def request_received(self, peer: str, tag: int, data: bytes) -> Awaitable[bytes] | bytes:
        message = decode_relay_message(data)
        if isinstance(message, Connect):
            return self._connect(peer, message.target)
        if isinstance(message, Offer):
            return self._offered(peer, message)
        if isinstance(message, Reach):
            return encode_relay_message(Reach(self._reach_list()))
        raise RelayRefusedError(f"{type(message).__name__} is a message, not a request")

    # --- as the relay -----------------------------------------------------------------------------
    async def _connect(self, source: str, target: str) -> bytes:
        config = self._host.config.relay
        problem = self._refusal(source, target)
        if problem is not None:
            self.counters.circuits_refused += 1
            log.info("refused to relay %s -> %s: %s", source, target, problem)
            raise RelayRefusedError(problem)
        circuit = self._new_circuit_id()
        try:
            await self._host.request(target, _TAG, encode_relay_message(Offer(source, circuit)), timeout=5.0)
        except QuicmeshError as error:
            self.counters.circuits_refused += 1
            raise RelayRefusedError(f"{target} refused the circuit: {error}") from None
        if len(self._circuits) >= config.max_circuits:  # filled while we asked
            raise RelayRefusedError(f"relay {self._host.node_name} is at its max_circuits ({config.max_circuits})")
        self._circuits[circuit] = _Circuit(circuit, source, target)
        self.counters.circuits_opened += 1
        log.info("relaying %s <-> %s (circuit %d)", source, target, circuit)
        return wire.encode_varint(circuit)

    def _refusal(self, source: str, target: str) -> str | None:
        config = self._host.config.relay
        me = self._host.node_name
        if not config.serve:
            return f"{me} does not relay ([relay] serve = false)"
        if config.allow is not None and source not in config.allow:
            return f"{me} does not relay for {source} (not in [relay] allow)"
        if target in (source, me):
            return f"a circuit from {source} to {target} through {me} would be a loop"
        if target not in self._host.direct_peers():
            return f"{me} has no direct connection to {target} (circuits are never chained)"
        if len(self._circuits) >= config.max_circuits:
            return f"{me} is at its max_circuits ({config.max_circuits})"
        mine = sum(1 for c in self._circuits.values() if source in (c.a, c.c))
        if mine >= config.max_circuits_per_peer:
            return f"{source} has {mine} circuits through {me} (max_circuits_per_peer)"
        for end in (source, target):
            if self._sure_limit(end) < MIN_OUTER_PAYLOAD:
                return (f"the connection {me}-{end} carries datagrams of at most {self._sure_limit(end)} "
                        f"bytes, relaying needs {MIN_OUTER_PAYLOAD} (limits.max_datagram_size 1452 on both)")
        return None

    def _sure_limit(self, peer: str) -> int:
        """The largest datagram (kind byte included) to ``peer`` whatever path MTU discovery finds later: the
        connection's limit now, but never above what this node's base packet size carries (a black hole sends
        packets back to it, and a circuit must not break then)."""
        base = self._host.config.limits.max_datagram_size - DATAGRAM_PACKET_OVERHEAD + wire.DATAGRAM_OVERHEAD
        return min(self._host.datagram_limit(peer), base)

    def _new_circuit_id(self) -> int:
        while self._next_circuit in self._circuits:
            self._next_circuit = self._next_circuit % wire.MAX_CIRCUIT_ID + 1
        circuit = self._next_circuit
        self._next_circuit = self._next_circuit % wire.MAX_CIRCUIT_ID + 1
        return circuit

    def _drop_circuit(self, circuit: _Circuit, reason: str, *, notify: bool, told_by: str | None = None) -> None:
        if self._circuits.pop(circuit.circuit, None) is None:
            return
        log.info("circuit %d (%s <-> %s) closed: %s", circuit.circuit, circuit.a, circuit.c, reason)
        if notify:
            for end in (circuit.a, circuit.c):
                if end != told_by:
                    self._send(end, Close(circuit.circuit, reason, up=False))

    # --- as the far end -----------------------------------------------------------------------------
    def _offered(self, relay: str, offer: Offer) -> bytes:
        config = self._host.config
        if not config.relay.use:
            raise RelayRefusedError(f"{config.node.name} takes no relayed connections ([relay] use = false)")
        if config.peer(offer.source) is None:
            raise RelayRefusedError(f"{offer.source} is not a configured peer of {config.node.name}")
        if offer.source == relay:
            raise RelayRefusedError(f"{relay} offered a circuit to itself")
        if self._sure_limit(relay) < MIN_OUTER_PAYLOAD:  # our packets to the relay: the relay cannot see their base
            raise RelayRefusedError(
                f"the connection {relay}-{config.node.name} carries datagrams of at most {self._sure_limit(relay)} "
                f"bytes from {config.node.name}, relaying needs {MIN_OUTER_PAYLOAD} (limits.max_datagram_size 1452 "
                "on both)")
        via_relay = sum(1 for path in self._paths.values() if path.relay == relay)
        if via_relay >= config.relay.max_circuits_per_peer or len(self._paths) >= config.relay.max_circuits:
            raise RelayRefusedError(f"{config.node.name} has too many relayed circuits (max_circuits_per_peer "
                                    f"{config.relay.max_circuits_per_peer}, max_circuits {config.relay.max_circuits})")
        self._paths[(relay, offer.circuit)] = CircuitPath(relay, offer.circuit, offer.source, self)
        return b""

    def _drop_unused_paths(self) -> None:
        """Circuits offered to us (or opened by us) whose inner connection never started: a relay cannot make
        us hold them forever."""
        deadline = time.monotonic() - _UNUSED_PATH
        for key, path in list(self._paths.items()):
            if path.packets_in == 0 and path.created < deadline:
                del self._paths[key]
                self._send(path.relay, Close(path.circuit, "unused", up=True))

    # --- reachability ----------------------------------------------------------------------------
    def _reach_list(self) -> tuple[tuple[str, int], ...]:
        peers = sorted(self._host.direct_peers().items())[:wire.MAX_REACH_ENTRIES]
        return tuple((name, int((rtt or 0.0) * 1e6)) for name, rtt in peers)

    def _send(self, peer: str, message: Close) -> None:
        async def send() -> None:
            try:
                await self._host.send_message(peer, _TAG, encode_relay_message(message))
            except QuicmeshError as error:  # gone, or an old version: it learns again on the next connection
                log.debug("relay message to %s not delivered: %s", peer, error)

        if self._host.running:
            self._host.spawn(send())

    # --- status -------------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        counters = self.counters
        return {
            "serving": self._host.config.relay.serve,
            "circuits": [{"id": c.circuit, "a": c.a, "c": c.c, "bytes": c.bytes_relayed}
                         for c in list(self._circuits.values())[:64]],
            "circuits_open": len(self._circuits),
            "paths": [{"relay": p.relay, "circuit": p.circuit, "peer": p.expected_peer} for p in self._paths.values()],
            "counters": {key: value for key, value in vars(counters).items() if key != "errors"},
            "errors": dict(counters.errors),
        }
