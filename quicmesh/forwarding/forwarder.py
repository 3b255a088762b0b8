"""UDP service forwarding: a rootless sidecar for unmodified UDP programs (docs/FORWARDING.md).

A node **exposes** a named UDP service (``[[services]]``: name, target address, allowed peers); another
node **forwards** a local UDP port to ``(peer, service)`` (``[[forwards]]``). Each datagram crosses the
mesh as one QUIC DATAGRAM frame (docs/PROTOCOL.md, "UDP service forwarding"):

- On each ready connection a node sends a ``Services`` control frame listing the services it exposes
  TO THAT PEER as ``(id, name)``; forwarders look the id up by name. A service a peer may not use is
  simply not in its list, and a FORWARD datagram naming it is dropped and counted by the exposing node.
- Forwarding side: one UDP socket per forward, bound to ``listen``. Each distinct local source address
  is a *client flow* with a ``flow_id`` (unique per peer) so replies reach the right sender.
- Exposing side: one UDP socket per ``(peer, service, flow_id)`` *service flow*, connected to the
  service's target, so the target sees one source port per remote client and its replies come back
  on that socket; they return as FORWARD_REPLY datagrams with the same ids.
- Flows close after ``limits.forward_idle_timeout`` without traffic; at most ``limits.max_flows_per_peer``
  flows per peer on each side (new ones over it are dropped and counted). A connection that breaks
  leaves the flows in place: when the peer is back, datagrams flow again on the same flows. A peer
  that restarted (new epoch in its Hello) gets its old service flows closed, since its flow ids are new.
- Datagrams over ``Forwarder.payload_limit(peer)`` (max_datagram_payload - 4) are dropped and
  counted: the local program is told nothing, as on a real network.

A node never sends a forwarded datagram to any address but the targets of its own ``[[services]]`` and
the source addresses that sent to its own ``[[forwards]]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from quicmesh.config import Address, Config, ForwardConfig, ServiceConfig
from quicmesh.errors import QuicmeshError
from quicmesh.protocol import wire
from quicmesh.protocol.addresses import format_address

from quicmesh.runtime.features import FeatureBase

if TYPE_CHECKING:
    from quicmesh.runtime.features import FeatureHost
    from quicmesh.runtime.node import Node

log = logging.getLogger("quicmesh.forward")

_RECV_BATCH = 256  # datagrams read per readiness callback before yielding to the event loop
_RECV_SIZE = 65536
_FLOWS_LISTED = 100
_LISTEN_BUFFER = 1 << 20  # flows shown per service/forward in the status document


class ForwardError(QuicmeshError):
    """A forward's listen address cannot be bound, or a service's target cannot be resolved."""


@dataclass
class ServiceCounters:
    datagrams_in: int = 0  # from peers, sent to the target
    datagrams_out: int = 0  # replies from the target, sent back to peers
    bytes_in: int = 0
    bytes_out: int = 0
    flows_opened: int = 0
    flows_expired: int = 0
    denied: int = 0  # from a peer not allowed to use the service
    flows_refused: int = 0  # a new flow over limits.max_flows_per_peer
    oversize: int = 0  # a reply over the forwarded payload limit
    dropped: int = 0  # peer not connected, its queue full, or the target socket refused it


@dataclass
class ForwardCounters:
    datagrams_out: int = 0  # from local clients, sent to the peer
    datagrams_in: int = 0  # replies from the peer, sent to local clients
    bytes_out: int = 0
    bytes_in: int = 0
    flows_opened: int = 0
    flows_expired: int = 0
    refused: int = 0  # the peer is connected but does not offer this service to us
    unavailable: int = 0  # the peer is not connected
    flows_refused: int = 0  # a new flow over limits.max_flows_per_peer
    oversize: int = 0  # a datagram over the forwarded payload limit
    dropped: int = 0  # the peer's datagram queue was full, or a local send failed


@dataclass
class FlowCounters:
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _ServiceFlow:
    __slots__ = ("service", "peer", "flow_id", "sock", "counters", "last", "opened")

    def __init__(self, service: _Service, peer: str, flow_id: int, sock: socket.socket, now: float) -> None:
        self.service, self.peer, self.flow_id, self.sock = service, peer, flow_id, sock
        self.counters = FlowCounters()
        self.last = self.opened = now


class _Service:
    def __init__(self, service_id: int, config: ServiceConfig, sockaddr: Any, family: int) -> None:
        self.id = service_id
        self.config = config
        self.sockaddr = sockaddr
        self.family = family
        self.counters = ServiceCounters()
        self.flows: dict[tuple[str, int], _ServiceFlow] = {}

    def allows(self, peer: str) -> bool:
        return self.config.allow is None or peer in self.config.allow


class _ClientFlow:
    __slots__ = ("forward", "source", "flow_id", "counters", "last", "opened")

    def __init__(self, forward: _Forward, source: Any, flow_id: int, now: float) -> None:
        self.forward, self.source, self.flow_id = forward, source, flow_id
        self.counters = FlowCounters()
        self.last = self.opened = now


class _Forward:
    def __init__(self, config: ForwardConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.address = sock.getsockname()
        self.counters = ForwardCounters()
        self.flows: dict[Any, _ClientFlow] = {}


class Forwarder(FeatureBase):
    """UDP service forwarding for one :class:`~quicmesh.runtime.node.Node`: ``await Forwarder(node).start()``.

    Uses the node's config (``[[services]]``, ``[[forwards]]``, ``[limits]``); :meth:`apply` takes a
    reloaded config, :meth:`stop` closes every socket. Single event loop, no threads.
    """

    #: the seam (runtime/features.py): the datagram kinds and control frames forwarding owns
    datagram_kinds = frozenset({int(wire.DatagramKind.FORWARD), int(wire.DatagramKind.FORWARD_REPLY)})
    control_frames = (wire.Services,)

    def __init__(self, node: Node) -> None:
        self.node = node
        self._host: FeatureHost = node.features
        self._config: Config = node.config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service_ids: dict[str, int] = {}  # stable for the process: a re-added name keeps its id
        self._services: dict[int, _Service] = {}
        self._forwards: list[_Forward] = []
        self._client_flows: dict[tuple[str, int], _ClientFlow] = {}
        self._next_flow_id: dict[str, int] = {}
        self._client_flow_count: Counter[str] = Counter()
        self._served_flow_count: Counter[str] = Counter()
        self._remote: dict[str, dict[str, int]] = {}  # peer -> name -> id it offers us
        self._epochs: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._buffer = bytearray(_RECV_SIZE)
        self._view = memoryview(self._buffer)
        self.unknown_service = 0  # FORWARD datagrams for an id this node does not expose
        self.unknown_flow = 0  # FORWARD_REPLY datagrams for no flow of ours
        self._warned: set[tuple[str, Any]] = set()
        self._running = False

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Expose services and bind forwards from the node's config; ForwardError if any forward cannot bind."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._host.add(self)
        errors = await self._apply(self.node.config)
        if errors:
            await self.stop()
            raise ForwardError("; ".join(errors))
        self._schedule_sweep()

    async def apply(self, config: Config) -> list[str]:
        """Apply a reloaded config: add/remove/change services and forwards. Returns the problems
        (logged; the rest is applied)."""
        errors = await self._apply(config)
        for error in errors:
            log.error("forwarding: %s", error)
        self._schedule_sweep()
        return errors

    async def stop(self) -> None:
        self._running = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for service in list(self._services.values()):
            self._close_service(service)
        for forward in list(self._forwards):
            self._close_forward(forward)
        self._host.remove(self)

    async def _apply(self, config: Config) -> list[str]:
        assert self._loop is not None
        self._config = config
        errors: list[str] = []
        # Services: keep unchanged ones (and their flows), close what changed or went.
        wanted = {s.name: s for s in config.services}
        for service in list(self._services.values()):
            new = wanted.get(service.config.name)
            if new is None or new.target != service.config.target:
                self._close_service(service)
            elif new.allow != service.config.allow:
                service.config = new
                for key, flow in list(service.flows.items()):
                    if not service.allows(flow.peer):
                        self._close_service_flow(flow)
        for name, service_config in wanted.items():
            if name not in self._service_ids and len(self._service_ids) >= wire.MAX_SERVICE_ID:
                errors.append(f"service {name}: too many service names since this node started; restart it")
                continue
            service_id = self._service_ids.setdefault(name, len(self._service_ids) + 1)
            if service_id in self._services:
                continue
            try:
                family, sockaddr = await self._resolve(service_config.target)
            except OSError as error:
                errors.append(f"service {name}: cannot resolve target {service_config.target}: {error}")
                continue
            self._services[service_id] = _Service(service_id, service_config, sockaddr, family)
            log.info("exposing UDP service %s -> %s to %s", name, service_config.target,
                     "every peer" if service_config.allow is None else ", ".join(service_config.allow) or "nobody")
        # Forwards: keep those whose config is unchanged.
        keep = []
        remaining = list(config.forwards)
        for forward in list(self._forwards):  # _close_forward removes from the list
            if forward.config in remaining:
                remaining.remove(forward.config)
                keep.append(forward)
            else:
                self._close_forward(forward)
        self._forwards = keep
        for forward_config in remaining:
            try:
                sock = await self._bind(forward_config.listen)
            except OSError as error:
                errors.append(f"forward {forward_config.listen} -> {forward_config.peer}/{forward_config.service}: "
                              f"cannot listen: {error.strerror or error}")
                continue
            forward = _Forward(forward_config, sock)
            self._forwards.append(forward)
            self._loop.add_reader(sock.fileno(), self._client_readable, forward)
            log.info("forwarding UDP %s -> peer %s service %s", format_address(forward.address),
                     forward_config.peer, forward_config.service)
        # Peers removed from the config: forget what they offered.
        for peer in list(self._remote):
            if config.peer(peer) is None:
                del self._remote[peer]
        for peer in self._host.connected_peers():
            self._announce(peer)
        return errors

    async def _resolve(self, address: Address) -> tuple[int, Any]:
        assert self._loop is not None
        infos = await self._loop.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"no address for {address.host}")
        family, _, _, _, sockaddr = infos[0]
        return family, sockaddr

    async def _bind(self, address: Address) -> socket.socket:
        family, sockaddr = await self._resolve(address)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # room for a burst of clients (capped by net.core.rmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LISTEN_BUFFER)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    # --- the seam: runtime/features.py's Feature ------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        """A new active connection to ``peer``: tell it which of our services it may use."""
        self._announce(peer)

    def control_received(self, peer: str, epoch: int, frame: object) -> None:
        if isinstance(frame, wire.Services):
            self._peer_services(peer, epoch, frame.entries)

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        kind, service_id, flow_id, payload = wire.decode_datagram(datagram)  # type: ignore[misc]
        if kind == wire.DatagramKind.FORWARD:
            self._to_service(peer, service_id, flow_id, payload)
        else:
            self._to_client(peer, flow_id, payload)

    def payload_limit(self, peer: str) -> int:
        """The largest forwarded UDP payload to ``peer``: its datagram limit minus the FORWARD header."""
        return self._host.datagram_limit(peer) - wire.DATAGRAM_OVERHEAD - wire.FORWARD_HEADER_MAX

    def _announce(self, peer: str) -> None:
        """Our Services frame to ``peer``: ``(id, name)`` of the services it may use."""
        entries = tuple((s.id, s.config.name) for s in self._services.values() if s.allows(peer))
        self._host.send_control(peer, wire.Services(entries))

    def _send(self, peer: str, service_id: int, flow_id: int, payload: bytes, *, reply: bool = False) -> str | None:
        encode = wire.encode_forward_reply_datagram if reply else wire.encode_forward_datagram
        return self._host.send_datagram(peer, encode(service_id, flow_id, payload), len(payload))

    def _peer_services(self, peer: str, epoch: int, entries: tuple[tuple[int, str], ...]) -> None:
        """The peer's Services frame: what it offers us now. A new epoch means it restarted."""
        previous = self._epochs.get(peer)
        self._epochs[peer] = epoch
        if previous is not None and previous != epoch:
            for service in self._services.values():
                for flow in [f for f in service.flows.values() if f.peer == peer]:
                    self._close_service_flow(flow)
        offered = {name: service_id for service_id, name in entries}
        self._remote[peer] = offered
        for forward in self._forwards:
            if forward.config.peer == peer and forward.config.service not in offered:
                log.warning("peer %s does not offer service %s to this node (it offers: %s)",
                                peer, forward.config.service, ", ".join(sorted(offered)) or "none")

    # --- exposing side: peer -> target, target -> peer --------------------------------------------
    def _to_service(self, peer: str, service_id: int, flow_id: int, payload: bytes) -> None:
        service = self._services.get(service_id)
        if service is None:
            self.unknown_service += 1
            self._warn_once((peer, service_id), "peer %s sent to service id %d, which this node does not expose",
                            peer, service_id)
            return
        counters = service.counters
        if not service.allows(peer):
            counters.denied += 1
            self._warn_once((peer, service.config.name), "peer %s may not use service %s: dropped",
                            peer, service.config.name)
            return
        flow = service.flows.get((peer, flow_id))
        now = time.monotonic()
        if flow is None:
            flow = self._open_service_flow(service, peer, flow_id, now)
            if flow is None:
                return
        flow.last = now
        try:
            flow.sock.send(payload)
        except OSError:  # full socket buffer, or the target refused an earlier datagram (ICMP)
            counters.dropped += 1
            return
        counters.datagrams_in += 1
        counters.bytes_in += len(payload)
        flow.counters.datagrams_in += 1
        flow.counters.bytes_in += len(payload)

    def _open_service_flow(self, service: _Service, peer: str, flow_id: int, now: float) -> _ServiceFlow | None:
        assert self._loop is not None
        if self._served_flow_count[peer] >= self._config.limits.max_flows_per_peer:
            service.counters.flows_refused += 1
            self._warn_once((peer, "served-limit"), "peer %s reached limits.max_flows_per_peer (%d): new flows dropped",
                            peer, self._config.limits.max_flows_per_peer)
            return None
        sock = socket.socket(service.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(service.sockaddr)
        except OSError as error:
            sock.close()
            service.counters.dropped += 1
            self._warn_once((service.config.name, "connect"), "service %s: cannot reach %s: %s",
                            service.config.name, service.config.target, error)
            return None
        flow = _ServiceFlow(service, peer, flow_id, sock, now)
        service.flows[(peer, flow_id)] = flow
        service.counters.flows_opened += 1
        self._served_flow_count[peer] += 1
        self._loop.add_reader(sock.fileno(), self._target_readable, flow)
        return flow

    def _target_readable(self, flow: _ServiceFlow) -> None:
        sock, service = flow.sock, flow.service
        counters = service.counters
        limit = self.payload_limit(flow.peer)
        for _ in range(_RECV_BATCH):
            try:
                size = sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED: the target is not listening
                counters.dropped += 1
                continue
            flow.last = time.monotonic()
            if size > limit:
                counters.oversize += 1
                continue
            data = bytes(self._view[:size])
            if self._send(flow.peer, service.id, flow.flow_id, data, reply=True) is not None:
                counters.dropped += 1
                continue
            counters.datagrams_out += 1
            counters.bytes_out += size
            flow.counters.datagrams_out += 1
            flow.counters.bytes_out += size

    def _close_service_flow(self, flow: _ServiceFlow, *, expired: bool = False) -> None:
        service = flow.service
        if service.flows.pop((flow.peer, flow.flow_id), None) is None:
            return
        self._served_flow_count[flow.peer] -= 1
        if expired:
            service.counters.flows_expired += 1
        if self._loop is not None:
            self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()

    def _close_service(self, service: _Service) -> None:
        for flow in list(service.flows.values()):
            self._close_service_flow(flow)
        self._services.pop(service.id, None)
        log.info("no longer exposing UDP service %s", service.config.name)

    # --- forwarding side: client -> peer, peer -> client -----------------------------------------
    def _client_readable(self, forward: _Forward) -> None:
        sock = forward.sock
        for _ in range(_RECV_BATCH):
            try:
                size, source = sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                forward.counters.dropped += 1
                continue
            self._from_client(forward, bytes(self._view[:size]), source)

    def _from_client(self, forward: _Forward, data: bytes, source: Any) -> None:
        counters, peer = forward.counters, forward.config.peer
        if len(data) > self.payload_limit(peer):
            counters.oversize += 1
            return
        offered = self._remote.get(peer)
        service_id = offered.get(forward.config.service) if offered is not None else None
        if service_id is None:
            if offered is not None and peer in self._host.connected_peers():
                counters.refused += 1
                self._warn_once((peer, forward.config.service, "refused"),
                                "peer %s does not offer service %s to this node: dropped", peer, forward.config.service)
            else:
                counters.unavailable += 1
            return
        now = time.monotonic()
        flow = forward.flows.get(source)
        if flow is None:
            flow = self._open_client_flow(forward, source, now)
            if flow is None:
                return
        flow.last = now
        problem = self._send(peer, service_id, flow.flow_id, data)
        if problem is not None:
            if problem == "not connected":
                counters.unavailable += 1
            else:
                counters.dropped += 1
            return
        counters.datagrams_out += 1
        counters.bytes_out += len(data)
        flow.counters.datagrams_out += 1
        flow.counters.bytes_out += len(data)

    def _open_client_flow(self, forward: _Forward, source: Any, now: float) -> _ClientFlow | None:
        peer = forward.config.peer
        if self._client_flow_count[peer] >= min(self._config.limits.max_flows_per_peer, wire.MAX_FLOW_ID + 1):
            forward.counters.flows_refused += 1
            self._warn_once((peer, "client-limit"), "flows to peer %s reached limits.max_flows_per_peer (%d): "
                            "new flows dropped", peer, self._config.limits.max_flows_per_peer)
            return None
        # Flow ids cycle through 0..MAX_FLOW_ID, skipping those in use: an id comes back only after
        # thousands of newer flows, long after the exposing side closed its flow for it.
        flow_id = self._next_flow_id.get(peer, 0)
        while (peer, flow_id) in self._client_flows:
            flow_id = (flow_id + 1) & wire.MAX_FLOW_ID
        self._next_flow_id[peer] = (flow_id + 1) & wire.MAX_FLOW_ID
        flow = _ClientFlow(forward, source, flow_id, now)
        forward.flows[source] = flow
        self._client_flows[(peer, flow_id)] = flow
        self._client_flow_count[peer] += 1
        forward.counters.flows_opened += 1
        return flow

    def _to_client(self, peer: str, flow_id: int, payload: bytes) -> None:
        flow = self._client_flows.get((peer, flow_id))
        if flow is None:
            self.unknown_flow += 1
            return
        forward = flow.forward
        flow.last = time.monotonic()
        try:
            forward.sock.sendto(payload, flow.source)
        except OSError:
            forward.counters.dropped += 1
            return
        forward.counters.datagrams_in += 1
        forward.counters.bytes_in += len(payload)
        flow.counters.datagrams_in += 1
        flow.counters.bytes_in += len(payload)

    def _close_client_flow(self, flow: _ClientFlow, *, expired: bool = False) -> None:
        forward = flow.forward
        peer = forward.config.peer
        if self._client_flows.pop((peer, flow.flow_id), None) is None:
            return
        forward.flows.pop(flow.source, None)
        self._client_flow_count[peer] -= 1
        if expired:
            forward.counters.flows_expired += 1

    def _close_forward(self, forward: _Forward) -> None:
        for flow in list(forward.flows.values()):
            self._close_client_flow(flow)
        if self._loop is not None:
            self._loop.remove_reader(forward.sock.fileno())
        forward.sock.close()
        if forward in self._forwards:
            self._forwards.remove(forward)
        log.info("stopped forwarding UDP %s", format_address(forward.address))

    # --- idle expiry ---------------------------------------------------------------------------------
    def _schedule_sweep(self) -> None:
        if not self._running or self._loop is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
        interval = min(max(self._config.limits.forward_idle_timeout / 4, 0.05), 5.0)
        self._sweeper = self._loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self._config.limits.forward_idle_timeout
        for service in list(self._services.values()):
            for flow in [f for f in service.flows.values() if f.last <= deadline]:
                self._close_service_flow(flow, expired=True)
        for flow in [f for f in self._client_flows.values() if f.last <= deadline]:
            self._close_client_flow(flow, expired=True)
        self._schedule_sweep()

    # --- status ------------------------------------------------------------------------------------------
    def open_sockets(self) -> int:
        """Sockets this forwarder holds open (one per forward, one per service flow): for leak checks."""
        return len(self._forwards) + sum(len(s.flows) for s in self._services.values())

    def status(self) -> dict[str, Any]:
        """JSON-ready counters per service, forward and flow (``quicmesh status``)."""
        now = time.monotonic()
        services = []
        for service in self._services.values():
            flows = sorted(service.flows.values(), key=lambda f: -f.last)
            services.append({
                "name": service.config.name,
                "id": service.id,
                "target": str(service.config.target),
                "allow": list(service.config.allow) if service.config.allow is not None else None,
                "flows_active": len(service.flows),
                "counters": asdict(service.counters),
                "flows": [{"peer": f.peer, "flow_id": f.flow_id, "idle": now - f.last, "age": now - f.opened,
                           "counters": asdict(f.counters)} for f in flows[:_FLOWS_LISTED]],
            })
        forwards = []
        for forward in self._forwards:
            flows = sorted(forward.flows.values(), key=lambda f: -f.last)
            peer = forward.config.peer
            forwards.append({
                "listen": format_address(forward.address),
                "peer": peer,
                "service": forward.config.service,
                "state": self._forward_state(forward),
                "max_payload": self.payload_limit(peer),
                "flows_active": len(forward.flows),
                "counters": asdict(forward.counters),
                "flows": [{"source": format_address(f.source), "flow_id": f.flow_id, "idle": now - f.last,
                           "age": now - f.opened, "counters": asdict(f.counters)} for f in flows[:_FLOWS_LISTED]],
            })
        return {
            "services": services,
            "forwards": forwards,
            "unknown_service": self.unknown_service,
            "unknown_flow": self.unknown_flow,
            "idle_timeout": self._config.limits.forward_idle_timeout,
            "max_flows_per_peer": self._config.limits.max_flows_per_peer,
        }

    def _forward_state(self, forward: _Forward) -> str:
        peer = forward.config.peer
        if peer not in self._host.connected_peers():
            return "peer down"
        offered = self._remote.get(peer)
        if offered is None:
            return "waiting"
        return "ready" if forward.config.service in offered else "not offered"

    def forward_address(self, index: int = 0) -> tuple[str, int]:
        """The bound address of the ``index``-th forward (its port, when the config said port 0)."""
        return self._forwards[index].address[:2]

    def _warn_once(self, key: tuple[str, Any], message: str, *args: Any) -> None:
        if key not in self._warned:
            if len(self._warned) > 1024:
                self._warned.clear()
            self._warned.add(key)
            log.warning(message, *args)
