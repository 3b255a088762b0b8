"""``quicmesh.Node``: the public asyncio API, wiring config -> credentials -> endpoint -> connections ->
channels -> features. It owns no protocol logic itself (docs/ARCHITECTURE.md has the map):

- runtime/peer_manager.py decides when to dial, which duplicate to keep, who is dead (sans-I/O);
- runtime/connections.py carries those decisions out and routes what the endpoint reports;
- runtime/connection.py is one connection and its state machine;
- runtime/datagrams.py, messages.py, requests.py are the channels; inbox.py and events.py what the
  application receives; features.py the seam that forwarding (and what comes next) plugs into.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from datetime import datetime

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509

from quicmesh.config import Config
from quicmesh.durable.feature import DurableMessages
from quicmesh.errors import (
    ConfigError,
    NodeClosedError,
    PeerNotConnectedError,
    QuicmeshError,
    RequestTimeoutError,
    StorageError,
    UnknownPeerError,
)
from quicmesh.protocol import wire
from quicmesh.protocol.addresses import format_address
from quicmesh.runtime.connection import Connection
from quicmesh.runtime.connections import Connections
from quicmesh.runtime.context import Context
from quicmesh.runtime.credentials import Credentials
from quicmesh.runtime.datagrams import DatagramChannel
from quicmesh.runtime.events import PeerEvent, PeerEvents, ReceiveHandler, Received, RequestHandler
from quicmesh.membership.feature import MembershipFeature
from quicmesh.nat.feature import NatFeature
from quicmesh.relay.feature import RelayFeature
from quicmesh.runtime.features import FeatureHost
from quicmesh.pubsub.feature import PubSub
from quicmesh.pubsub.subscription import Handler as SubjectHandler, Subscription
from quicmesh.runtime.inbox import Inbox
from quicmesh.runtime.messages import MessageChannel
from quicmesh.runtime.peer import Peer, PeerStatus
from quicmesh.transport.endpoint import Endpoint
from quicmesh.transport.guard import Guard
from quicmesh.transport.guard import settings_for as guard_settings

log = logging.getLogger("quicmesh.node")

__all__ = ["Node", "PeerEvent", "PeerStatus", "Received"]


class Node:
    """One mesh node: a QUIC endpoint that keeps verified connections to every configured peer."""

    def __init__(self, config: Config) -> None:
        self._ctx = ctx = Context(config)
        ctx.peers.update((peer.name, Peer(peer, config.limits.message_window)) for peer in config.peers)
        self._inbox = Inbox(ctx)
        self._events = PeerEvents()
        self._datagrams = DatagramChannel(ctx, self._inbox)
        self._messages = MessageChannel(ctx, self._inbox)
        self._connections = Connections(ctx, self._datagrams, self._messages, self._events)
        #: the extension seam: features (UDP forwarding, ...) plug in here
        self.features = FeatureHost(ctx, self._datagrams, self._messages, self._connections, self._inbox)
        self._connections.features = self.features
        self._pubsub = PubSub(self.features, lambda: ctx.config)  # subjects: publish/subscribe (quicmesh/pubsub)
        self.features.add(self._pubsub)
        self._relay = RelayFeature(self.features)  # reaching peers through a third node (quicmesh/relay)
        self.features.add(self._relay)
        self._nat = NatFeature(self.features)  # observed addresses, hole punching (quicmesh/nat)
        self.features.add(self._nat)
        self._membership = MembershipFeature(self.features)  # announcements, seeds, CRLs (quicmesh/membership)
        self.features.add(self._membership)
        self._durable: DurableMessages | None = None  # [storage] path: durable messages (quicmesh/durable)
        if config.storage.path is not None:
            self._durable = DurableMessages(self.features, config.storage, config.limits.message_window,
                                            lambda: self._inbox.handler)
            self.features.add(self._durable)
        self._endpoint: Endpoint | None = None
        self.listen_address: tuple[str, int] | None = None

    # --- properties -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._ctx.name

    @property
    def mesh(self) -> str:
        return self._ctx.config.node.mesh

    @property
    def config(self) -> Config:
        return self._ctx.config

    @property
    def epoch(self) -> int:
        return self._ctx.epoch

    @property
    def max_datagram_payload(self) -> int:
        """The largest payload :meth:`send_datagram` takes before path MTU discovery (a peer's limit grows once
        larger packets get through, see :meth:`datagram_limit`; peers may also take less)."""
        return self._datagrams.max_payload

    @property
    def _credentials(self) -> Credentials:
        credentials = self._connections.credentials
        if credentials is None:
            raise QuicmeshError(f"node {self.name} was not started")
        return credentials

    @property
    def cert_not_after(self) -> datetime:
        return self._credentials.chain[0].not_valid_after_utc

    @property
    def fingerprint(self) -> str:
        return self._credentials.fingerprint

    @property
    def ca_not_after(self) -> datetime:
        """When the first certificate of the mesh CA bundle expires (the whole mesh stops then)."""
        return min(cert.not_valid_after_utc for cert in x509.load_pem_x509_certificates(self._credentials.ca_pem))

    @property
    def inbox_dropped(self) -> int:
        return self._inbox.dropped

    @property
    def rejections(self) -> deque[tuple[float, str, str]]:
        """The latest handshake rejections, either way: (unix time, address, reason)."""
        return self._connections.rejections

    @property
    def rejection_count(self) -> int:
        return self._connections.rejection_count

    def socket_counters(self) -> dict[str, int]:
        """UDP packets through the node's socket (a GSO send counts each packet) and failed sends."""
        endpoint = self._endpoint
        if endpoint is None:
            return {"packets_in": 0, "packets_out": 0, "send_errors": 0}
        return {"packets_in": endpoint.packets_in, "packets_out": endpoint.packets_out,
                "send_errors": endpoint.send_errors}

    def guard_status(self) -> dict[str, object] | None:
        """Strangers' counters (transport/guard.py): drops by reason, what is enforced; None before start."""
        endpoint = self._endpoint
        if endpoint is None or endpoint.guard is None:
            return None
        return {**endpoint.guard.status(), "stray_packets": endpoint.stray_packets,
                "pending_handshakes": endpoint.pending_handshakes()}

    # --- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load credentials, bind the UDP port and start dialing peers."""
        ctx = self._ctx
        if ctx.state != "new":
            raise QuicmeshError(f"node {self.name} was already started")
        connections = self._connections
        connections.credentials = Credentials(ctx.config)
        endpoint = Endpoint(
            connections,
            connections.new_server_connection,
            supported_versions=QuicConfiguration(is_client=False).supported_versions,
            receive_size=ctx.config.limits.max_datagram_size,
        )
        endpoint.guard = Guard(await guard_settings(ctx.config), ctx.now())
        listen = ctx.config.node.listen
        self.listen_address = ctx.listen_address = endpoint.open(listen.host, listen.port)
        if self._durable is not None:
            try:
                await self._durable.open()  # an unusable database: StorageError naming it, the node does not start
            except BaseException:
                endpoint.close()
                raise
        connections.endpoint = self._endpoint = endpoint
        ctx.touch = _toucher(endpoint)
        ctx.state = "running"
        log.info("endpoint started", extra={"event": "endpoint_started", "node": self.name, "mesh": self.mesh,
                                        "listen": format_address(self.listen_address),
                                        "fingerprint": self.fingerprint, "peers": len(ctx.peers)})
        connections.tick()
        self._relay.start()
        self._nat.start()
        self._membership.start()

    async def stop(self, reason: str = "shutdown") -> None:
        """Tell every peer we are going, close every connection, then the socket."""
        ctx = self._ctx
        if ctx.state in ("stopping", "stopped"):
            return
        if ctx.state == "new":
            ctx.state = "stopped"
            return
        if ctx.state == "running" and reason == "shutdown":
            await self._membership.leave()  # a signed departure first, while messages still flow
        ctx.state = "stopping"
        connections, endpoint = self._connections, self._endpoint
        assert endpoint is not None
        connections.stop_timer()
        # GoAway first, so peers drop the connection at once instead of after aioquic's draining period;
        # it must leave in a packet of its own, since CONNECTION_CLOSE discards pending stream data.
        for connection in list(connections.by_id.values()):
            connections.send_goaway(connection, wire.ErrorCode.SHUTDOWN, reason)
            ctx.touch(connection)
        await asyncio.sleep(0.01)
        for connection in list(connections.by_id.values()):
            connections.close(connection, wire.ErrorCode.SHUTDOWN, reason)
        # Wait (bounded) for those closes to go out; not for the refusals of handshakes begun since.
        closing = endpoint.links()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while any(not link.terminated for link in closing) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        ctx.cancel_tasks()
        endpoint.close()
        ctx.state = "stopped"
        closed = NodeClosedError(f"node {self.name} stopped")
        for peer in ctx.peers.values():
            self._messages.fail_unacked(peer, closed)
        for connection in list(connections.by_id.values()):
            connections.requests.fail(connection, closed)
        connections.by_id.clear()
        self._inbox.close()
        self._events.close()
        self.features.node_stopping()
        if self._durable is not None:
            await self._durable.close()
        log.info("endpoint stopped", extra={"event": "endpoint_stopped", "node": self.name, "reason": reason})

    # --- datagrams ------------------------------------------------------------------------------
    def send_datagram(self, peer: str, data: bytes) -> None:
        """Send an unreliable datagram to a connected peer (dropped and counted if its queue is full)."""
        self._datagrams.send(peer, data)

    def datagram_limit(self, peer: str) -> int:
        """The largest payload :meth:`send_datagram` takes for ``peer`` now: what its connection's packets carry
        (path MTU discovery grows them) and its node accepts; ``max_datagram_payload`` while not connected."""
        return self._datagrams.peer_limit(self._ctx.peer_or_raise(peer))

    def datagram_backlog(self, peer: str) -> int:
        """Datagrams for ``peer`` not yet on the wire (local queue + QUIC's): lets a sender pace itself."""
        return self._datagrams.backlog(peer)

    def broadcast_datagram(self, data: bytes) -> list[str]:
        """Send a datagram to every connected peer; returns the names it was sent to."""
        sent = self.connected_peers()
        for name in sent:
            self._datagrams.send(name, data)
        return sent

    # --- reliable messages and requests -----------------------------------------------------------
    async def send(self, peer: str, data: bytes, *, durable: bool = False, ttl: float | None = None) -> None:
        """Send a reliable message; returns once the peer's node has accepted it for its application.
        ``durable=True`` (needs [storage]): returns once committed to this node's outbox (docs/DURABLE.md)."""
        if durable or ttl is not None:
            await self._send_durable(peer, data, durable, ttl)
            return
        await self._messages.send(peer, data)

    async def broadcast(self, data: bytes) -> dict[str, Exception | None]:
        """Send a reliable message to every configured peer concurrently; per-peer outcome."""
        names = list(self._ctx.peers)
        results = await asyncio.gather(*(self.send(name, data) for name in names), return_exceptions=True)
        outcome: dict[str, Exception | None] = {}
        for name, result in zip(names, results):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            outcome[name] = result
        return outcome

    def set_request_handler(self, handler: RequestHandler | None) -> None:
        """Install ``async def handler(peer, data) -> bytes`` (each request runs as a task), or a plain
        ``def handler(peer, data) -> bytes``, answered at once without a task (quicker, must not block).
        Its exceptions reach the caller as RemoteError."""
        self._connections.requests.handler = handler

    async def request(self, peer: str, data: bytes, timeout: float = 5.0) -> bytes:
        """Send a request on its own bidirectional stream and wait for the peer handler's response."""
        target = self._ctx.peer_or_raise(peer)
        self._ctx.check_running()
        self._messages.check_size(target, data)
        return await self._connections.requests.request(target, data, timeout)

    async def ping(self, peer: str, timeout: float = 5.0) -> float:
        """Round-trip time to ``peer`` in seconds: a QUIC PING on its connection until the peer's ACK."""
        target = self._ctx.peer_or_raise(peer)
        self._ctx.check_running()
        connection = target.usable_connection
        if connection is None:
            raise PeerNotConnectedError(f"peer {peer} is not connected")
        started = time.perf_counter()  # not the loop's clock: uvloop's ticks in whole milliseconds
        waiter = self._connections.ping(connection)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            connection.pings = {uid: w for uid, w in connection.pings.items() if w is not waiter}
            raise RequestTimeoutError(f"no answer to a ping from {peer} within {timeout:g}s") from None
        return time.perf_counter() - started

    # --- receiving, events, status -----------------------------------------------------------------
    def set_receive_handler(self, handler: ReceiveHandler | None) -> None:
        """Hand each datagram and message to ``handler(item)`` the moment it arrives, instead of to recv().

        The lowest-latency way to receive (no task switch: measured ~130 us less per datagram with uvloop).
        It runs inside the node's packet processing, so it must be quick and must not block; a message is
        acknowledged once it returns. An exception it raises is logged and the item counts as delivered.
        ``None`` goes back to recv(). Items already waiting for recv() stay there.
        """
        self._inbox.handler = handler

    async def recv(self) -> Received:
        """The next received datagram or message (raises NodeClosedError once the node stopped)."""
        item = await self._inbox.recv()
        if self._messages.parked:
            self._messages.unpark()
        return item

    async def received(self) -> AsyncIterator[Received]:
        """Iterate over received items until the node stops (what recv() gives, without a coroutine per
        item: items already waiting are yielded straight from the inbox)."""
        inbox, messages = self._inbox, self._messages
        while True:
            item = inbox.take()
            if item is None:
                try:
                    await inbox.wait()
                except NodeClosedError:
                    return
                continue
            if messages.parked:
                messages.unpark()
            yield item

    async def events(self) -> AsyncIterator[PeerEvent]:
        """Iterate over peer connected/disconnected events from now on, until the node stops."""
        async for event in self._events.subscribe():
            yield event

    def connected_peers(self) -> list[str]:
        return [name for name, peer in self._ctx.peers.items() if peer.usable_connection is not None]

    async def wait_connected(self, peers: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Wait until the given peers (default: the config's [[peers]]) are connected; TimeoutError otherwise."""
        wanted = {p.name for p in self._ctx.config.peers} if peers is None else set(peers)
        for name in wanted:
            self._ctx.peer_or_raise(name)
        async with asyncio.timeout(timeout):
            while not wanted <= set(self.connected_peers()):
                self._ctx.check_running()
                await self._events.wait_changed()

    def peers(self) -> list[PeerStatus]:
        """The configured peers and the members this node holds a connection to (or dials)."""
        connections = self._connections
        now = self._ctx.now()
        statuses = []
        for name, peer in self._ctx.peers.items():
            connection = peer.usable_connection
            if peer.member and connection is None and not connections.mesh.dials(name):
                continue  # a member we hold no connection to (on demand): `quicmesh members` lists it
            view = connections.mesh.view(name, now)
            heard = _last_heard(connection)
            remote = connection.quic.get_peer_address() if connection else None
            statuses.append(PeerStatus(
                name=name,
                state=view.state.value,
                address=str(peer.config.address),
                remote_address=format_address(remote) if remote else None,
                rtt=connection.quic.smoothed_rtt() if connection else None,
                last_seen=(time.time() - (now - heard)) if heard else None,
                connected_since=peer.connected_since,
                fingerprint=peer.fingerprint,
                last_error=view.last_error,
                next_retry=view.next_retry_in,
                counters=peer.counters.to_dict(),
                path=None if connection is None else (f"via {connection.relay}" if connection.relay else "direct"),
            ))
        return statuses

    # --- reload ------------------------------------------------------------------------------------
    async def reload(self, config: Config) -> None:
        """Apply a new config: certs, CA, CRL, peers and timers; healthy connections stay up."""
        ctx = self._ctx
        ctx.check_running()
        connections, endpoint = self._connections, self._endpoint
        assert endpoint is not None and endpoint.guard is not None
        changed = [key for key, old, new in (
            ("node.name", ctx.config.node.name, config.node.name),
            ("node.mesh", ctx.config.node.mesh, config.node.mesh),
            ("node.listen", ctx.config.node.listen, config.node.listen),
        ) if old != new]
        if changed:
            raise ConfigError([f"{key}: cannot change on reload; restart the node" for key in changed])
        credentials = Credentials(config)
        guard_config = await guard_settings(config)
        connections.credentials = credentials
        endpoint.guard.configure(guard_config, ctx.now())
        ctx.config = config
        new_peers = {peer.name: peer for peer in config.peers}
        members = {name for name, peer in ctx.peers.items() if peer.member and name not in new_peers}
        for name in list(ctx.peers):
            if name not in new_peers and name not in members:
                removed = ctx.peers.pop(name)
                self._messages.fail_unacked(removed, UnknownPeerError(f"peer {name} was removed from the config"))
        for name, peer_config in new_peers.items():
            if name in ctx.peers:
                ctx.peers[name].config = peer_config
                ctx.peers[name].member = False  # configured now: dialed, and kept by the config
                connections.mesh.add_peer(name, ctx.now(), dial=True)
            else:
                ctx.peers[name] = Peer(peer_config, config.limits.message_window)
        connections.mesh.set_timers(config.timers)
        actions = connections.mesh.set_peers(new_peers, ctx.now(), keep=members)
        connections.apply([*actions, *connections.recheck()])
        log.info("node reloaded", extra={"event": "node_reloaded", "node": self.name, "peers": len(ctx.peers)})

    # --- durable messages (quicmesh/durable) ---------------------------------------------------------
    async def _send_durable(self, peer: str, data: bytes, durable: bool, ttl: float | None) -> None:
        if not durable:
            raise QuicmeshError("ttl is for durable messages: send(peer, data, durable=True, ttl=...)")
        if self._durable is None:
            raise StorageError(f"node {self.name} has no [storage] path: durable messages are off")
        target = self._ctx.peer_or_raise(peer)
        self._ctx.check_running()
        self._messages.check_size(target, data)
        await self._durable.send(peer, data, ttl)
    # --- end of durable messages -----------------------------------------------------------------------

    # --- subjects (quicmesh/pubsub) ------------------------------------------------------------------
    async def publish(self, subject: str, data: bytes, *, reliable: bool = False) -> int:
        """Publish ``data`` on ``subject`` to every matching subscriber in the mesh (this node's too) and
        one member of each matching queue group: datagrams, or ``reliable`` messages (returns once every
        node accepted it; PublishError otherwise). The number of nodes it was handed to. docs/PUBSUB.md."""
        return await self._pubsub.publish(subject, data, reliable=reliable)

    def subscribe(self, subject: str, *, queue: str | None = None, handler: SubjectHandler | None = None,
                  max_pending: int | None = None) -> Subscription:
        """Subscribe to a subject pattern (``*`` one token, ``>`` the rest), as a member of ``queue`` if
        given: an async iterator of messages, or ``handler(msg)`` called for each. ``close()`` ends it."""
        return self._pubsub.subscribe(subject, queue=queue, handler=handler, max_pending=max_pending)

    async def request_subject(self, subject: str, data: bytes, timeout: float = 5.0) -> bytes:
        """Ask one subscriber of ``subject``, wherever it is; its response (NoRespondersError,
        RequestTimeoutError). Compare ``request(peer, ...)``, which names the node."""
        return await self._pubsub.request(subject, data, timeout)

    def serve_subject(self, subject: str, handler: SubjectHandler, *, queue: str | None = None) -> Subscription:
        """Answer requests on ``subject`` with ``handler(msg) -> bytes`` (or an awaitable of bytes)."""
        return self._pubsub.subscribe(subject, queue=queue, handler=handler)
    # --- end of subjects ----------------------------------------------------------------------------


def _toucher(endpoint: Endpoint):  # noqa: ANN202 - a closure over the endpoint, for Context.touch
    touch = endpoint.touch

    def touch_connection(connection: Connection) -> None:
        touch(connection.link)

    return touch_connection


def _last_heard(connection: Connection | None) -> float | None:
    if connection is None or not connection.link.last_received:
        return None
    return connection.link.last_received
