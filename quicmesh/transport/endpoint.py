"""One UDP socket, many QUIC connections: the thin asyncio layer under the node.

aioquic's own asyncio helpers open a new socket per outgoing connection; a mesh node must accept and dial
from ONE port (peers and firewalls know that port), so this module owns the socket and routes every packet
by its destination connection ID, the way aioquic's QuicServer does, for dialed and accepted connections
alike. It knows nothing of the mesh: what to do with a connection's events is the handler's business.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from quicmesh.transport._aioquic import MeshQuicConnection
from quicmesh.transport.guard import Guard
from quicmesh.transport.pmtud import DEFAULT_CAP

log = logging.getLogger("quicmesh.transport")

Address = tuple[str, int]

#: How many datagrams one readable event may drain before flushing and yielding to the event loop. Small:
#: a batch's ACKs leave only after it, and late ACKs hold the sender back. Datagrams: 256 -> 55-67k/s,
#: 16 -> 100-108k/s. Acked messages: a 64-message window fits in ~7 packets, so with 16 the receiver
#: took the whole window before acking any of it and sender and receiver worked in turns (uvloop: 16 ->
#: 9.9-13.9k msgs/s, 8 -> 13.1k, 4 -> 21-23.6k, 2 -> 20.4k, 1 -> 13.4k; datagrams with 4 at least as fast as 16).
_READ_BATCH = 4
_SMALLEST_INITIAL = 1200
#: A packet after this long without one is acknowledged at once (see Link.ack_now); within a burst, ACKs
#: keep aioquic's delay, which lets one ACK cover many packets.
_QUIET = 0.1
#: A link touched this many times since its last flush is flushed at once rather than at the end of the
#: loop turn: the peer starts on the first writes while we make the rest (64 messages in flight, all sent
#: in one turn, went out as one 16 KiB packet once path MTU discovery grew packets, and the two ends took
#: turns: 20-23k acked messages/s; flushing every 32 writes: 29-38k; 16 or 48: less, bench/compare)
_FLUSH_AFTER_TOUCHES = 32

# UDP generic segmentation offload (Linux >= 4.18): several equal-sized packets to one address leave in ONE
# sendmsg, which the kernel splits. Measured with `python -m quicmesh.bench.compare`: the sending side's CPU
# per datagram is dominated by one sendto per packet without it. QUICMESH_GSO=0 turns it off.
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000
_GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_SEGMENT_SIZE = struct.Struct("=H")
# Linux's IP_MTU_DISCOVER / IPV6_MTU_DISCOVER = *_PMTUDISC_PROBE (not in Python's socket module).
_IP_MTU_DISCOVER = 10
_IPV6_MTU_DISCOVER = 23
_PMTUDISC_PROBE = 3

# A socket bound to a wildcard address (0.0.0.0, ::) would answer from the kernel's choice of source
# address, which on a host with several addresses need not be the one the peer dialed: a QUIC client drops
# a handshake from another address. So such a socket asks for each packet's destination address
# (IP_PKTINFO / IPV6_PKTINFO) and sends each connection's packets from the address it was reached at.
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux; Python's socket module lacks the name
_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst (source to use), addr (header destination)
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_PKTINFO_SPACE = socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_IN_PKTINFO.size)
_MAX_SOURCES = 256  # cached source cmsgs (one per local address that packets arrive at)


@dataclass(eq=False)
class Link:
    """One QUIC connection on the endpoint, with the bookkeeping the endpoint needs for it."""

    conn_id: int
    quic: MeshQuicConnection
    dialed: bool
    address: Address | None = None
    cids: set[bytes] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    last_received: float = 0.0
    terminated: bool = False
    #: on a wildcard socket: the cmsg that sends from the local address the peer reaches us at
    source: list[tuple[int, int, bytes]] | None = None
    #: let a pending delayed ACK leave at the next flush: the handler queued data (touch), which it can
    #: ride on, or the first packet after a quiet spell arrived (a keepalive PING: answered at once
    #: instead of by a timer 1 ms later, one wake-up less per keepalive on an idle mesh)
    ack_now: bool = False
    #: writes queued since the last flush (see _FLUSH_AFTER_TOUCHES)
    touches: int = 0
    #: a relayed link's circuit: its packets go through ``path.send``, not the socket (None: direct)
    path: RelayPath | None = None

    def handshaking(self) -> bool:
        """An accepted connection whose handshake has not completed (nor failed) yet."""
        return not self.terminated and not self.quic.handshake_complete


class RelayPath(Protocol):
    """A circuit through a relay node, carrying one inner QUIC connection instead of the socket."""

    #: stands in for the peer's UDP address in aioquic's path bookkeeping and in logs; unique per circuit
    address: Address
    #: the node that must answer at the other end (an accepted inner connection is verified against it)
    expected_peer: str
    #: the relay node the circuit goes through
    relay: str

    def send(self, packet: bytes) -> None: ...

    def closed(self) -> None:
        """The inner connection is gone: release the circuit."""


class LinkHandler(Protocol):
    def link_accepted(self, link: Link) -> None: ...
    def link_event(self, link: Link, event: events.QuicEvent) -> None: ...
    def link_terminated(self, link: Link, event: events.ConnectionTerminated) -> None: ...
    def before_flush(self, link: Link) -> None: ...


class Endpoint:
    """Owns the UDP socket; creates, routes, times and flushes QUIC connections."""

    def __init__(
        self,
        handler: LinkHandler,
        make_server_connection: Callable[..., MeshQuicConnection],
        *,
        supported_versions: list[int],
        receive_size: int = 2048,
    ) -> None:
        self._handler = handler
        self._make_server_connection = make_server_connection
        self._supported_versions = supported_versions
        self._receive_size = max(receive_size, DEFAULT_CAP)  # path MTU discovery may raise packets up to it
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._routes: dict[bytes, Link] = {}
        self._links: dict[int, Link] = {}
        self._next_conn_id = 1
        self._dirty: dict[int, Link] = {}
        self._flush_scheduled = False
        self.packets_in = 0
        self.packets_out = 0
        self.gso = False
        self.send_errors = 0
        self.stray_packets = 0
        #: quicmesh.transport.guard.Guard: allowlist, handshake limits, Retry (None: accept every source)
        self.guard: Guard | None = None
        self._handshaking: set[Link] = set()  # accepted links whose handshake may still be in progress
        self._pktinfo = False  # wildcard socket: packets carry their destination address (see _IP_PKTINFO)
        self._arrival_source: list[tuple[int, int, bytes]] | None = None  # of the last packet read (pktinfo)
        self._sources: dict[bytes, list[tuple[int, int, bytes]]] = {}
        self._relayed: dict[Address, Link] = {}  # relayed links by their circuit's stand-in address
        self.relayed_packets_in = 0
        self.relayed_packets_out = 0

    # --- socket ---------------------------------------------------------------------------
    def open(self, host: str, port: int) -> Address:
        """Bind the socket (IPv4, or dual-stack IPv6 for a v6 host) and start reading."""
        family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
                except OSError:  # pragma: no cover - capped by the kernel, best effort
                    pass
            sock.bind((host, port))
            sock.setblocking(False)
            if host in ("0.0.0.0", "::"):
                self._pktinfo = _enable_pktinfo(sock)
            _set_dont_fragment(sock)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.gso = _gso_available(sock)
        self._loop.add_reader(sock.fileno(), self._on_readable)
        bound = sock.getsockname()
        return (bound[0], bound[1])

    @property
    def family(self) -> int:
        assert self._sock is not None
        return self._sock.family

    def close(self) -> None:
        """Stop reading and close the socket (connections should have been closed first)."""
        for link in list(self._links.values()):
            self._forget(link)
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # --- connections ----------------------------------------------------------------------
    def new_client_link(self, quic: MeshQuicConnection) -> Link:
        """Register a client connection; :meth:`connect` starts it once the address is resolved."""
        return self._register(quic, dialed=True)

    def connect(self, link: Link, address: Address) -> None:
        """Send the first Initial of a client connection from the shared socket."""
        link.address = address
        link.quic.connect(address, now=self._loop.time())
        self.touch(link)

    def new_relayed_client_link(self, quic: MeshQuicConnection, path: RelayPath) -> Link:
        """Dial through a relay circuit: the connection's packets go to ``path.send``."""
        link = self._register(quic, dialed=True, path=path)
        link.address = path.address
        self._relayed[path.address] = link
        quic.connect(path.address, now=self._loop.time())
        self.touch(link)
        return link

    def relayed_packet(self, path: RelayPath, data: bytes) -> None:
        """An inner QUIC packet that came through ``path``: to its connection, or a new accepted one if it
        is a valid Initial (the relay and the other end already agreed on the circuit)."""
        now = self._loop.time()
        link = self._relayed.get(path.address)
        if link is None:
            link = self._accept_relayed(data, path)
            if link is None:
                return
        self.relayed_packets_in += 1
        if now - link.last_received > _QUIET:
            link.ack_now = True
        link.last_received = now
        link.quic.receive_datagram(data, path.address, now)
        self._process(link)
        self._schedule_flush()

    def _accept_relayed(self, data: bytes, path: RelayPath) -> Link | None:
        header = self._long_header(data)
        if header is None:
            return None
        if (len(data) < _SMALLEST_INITIAL or header.packet_type != QuicPacketType.INITIAL
                or header.version not in self._supported_versions):
            self.stray_packets += 1
            return None
        link = self._register(self._make_server_connection(header.destination_cid, None, path), dialed=False,
                              path=path)
        link.address = path.address
        self._relayed[path.address] = link
        self._handler.link_accepted(link)
        return link

    def abandon(self, link: Link) -> None:
        """Forget a client connection that never sent a packet (its address did not resolve)."""
        self._forget(link)

    def links(self) -> list[Link]:
        return list(self._links.values())

    def pending_handshakes(self) -> int:
        """Accepted connections still handshaking (tracked while the guard caps them)."""
        return sum(1 for link in self._handshaking if link.handshaking())

    def touch(self, link: Link) -> None:
        """Something was queued on the connection: flush it at the end of this loop iteration (at once
        after _FLUSH_AFTER_TOUCHES of them)."""
        link.ack_now = True
        link.touches += 1
        if link.touches >= _FLUSH_AFTER_TOUCHES:
            self._dirty.pop(link.conn_id, None)
            self._flush(link)
            return
        self._dirty[link.conn_id] = link
        self._schedule_flush()

    def _register(self, quic: MeshQuicConnection, *, dialed: bool, path: RelayPath | None = None) -> Link:
        link = Link(conn_id=self._next_conn_id, quic=quic, dialed=dialed, path=path)
        self._next_conn_id += 1
        self._links[link.conn_id] = link
        if path is None:  # a relayed link's packets never come from the socket
            self._route(link, quic.host_cid)
        return link

    def _route(self, link: Link, cid: bytes) -> None:
        link.cids.add(cid)
        self._routes[cid] = link

    def _forget(self, link: Link) -> None:
        link.terminated = True
        self._handshaking.discard(link)
        for cid in link.cids:
            if self._routes.get(cid) is link:
                del self._routes[cid]
        link.cids.clear()
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        self._links.pop(link.conn_id, None)
        self._dirty.pop(link.conn_id, None)
        if link.path is not None and self._relayed.get(link.path.address) is link:
            del self._relayed[link.path.address]
            link.path.closed()

    # --- receive --------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = self._loop.time()
        size = self._receive_size
        pktinfo = self._pktinfo
        last_ancillary: list[tuple[int, int, bytes]] | None = None
        for _ in range(_READ_BATCH):
            try:
                if pktinfo:  # a wildcard socket: note where each packet was sent to (see _IP_PKTINFO)
                    data, ancillary, _flags, addr = sock.recvmsg(size, _PKTINFO_SPACE)
                else:
                    data, addr = sock.recvfrom(size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:  # e.g. ICMP port unreachable surfaced as ECONNREFUSED
                log.debug("socket receive error: %s", error)
                continue
            self.packets_in += 1
            if pktinfo and ancillary != last_ancillary:  # same local address as the packet before: same source
                last_ancillary = ancillary
                self._arrival_source = self._source_for(ancillary)
            self._datagram_received(data, (addr[0], addr[1]), now)
        self._schedule_flush()

    def _source_for(self, ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]] | None:
        """The cmsg that sends from the address a packet arrived at (None: let the kernel choose)."""
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
                local = _IN_PKTINFO.unpack_from(data)[2]
                cmsg = (socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(0, local, bytes(4)))
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
                local = _IN6_PKTINFO.unpack_from(data)[0]
                cmsg = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(local, 0))
            else:
                continue
            source = self._sources.get(local)
            if source is None:
                if len(self._sources) >= _MAX_SOURCES:
                    self._sources.clear()
                source = self._sources[local] = [cmsg]
            return source
        return None

    def _datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        if not data:
            return
        first = data[0]
        if first & 0x80:  # long header: DCID length at byte 5
            if len(data) < 6:
                self.stray_packets += 1
                return
            dcid = data[6 : 6 + data[5]]
        else:
            dcid = data[1:9]
        link = self._routes.get(dcid)
        if self.guard is not None and (link is None or not link.dialed) and not self.guard.allowed(addr[0]):
            return  # a stranger: dropped before aioquic sees it (replies to our own dials always pass)
        if link is None:
            link = self._accept(data, addr, now)
            if link is None:
                return
        if now - link.last_received > _QUIET:
            link.ack_now = True
        if self._arrival_source is not None:
            link.source = self._arrival_source
        link.last_received = now
        link.quic.receive_datagram(data, addr, now)
        self._process(link)

    def _accept(self, data: bytes, addr: Address, now: float) -> Link | None:
        """A packet for no known connection: start a server connection if it is a valid Initial."""
        header = self._long_header(data)
        if header is None:
            return None
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self._supported_versions
        ):
            if len(data) < _SMALLEST_INITIAL:  # RFC 9000 5.2.2: no reply that is bigger than the request
                self.stray_packets += 1
                return None
            self._sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._supported_versions,
                ),
                addr,
                self._arrival_source,
            )
            return None
        if header.packet_type != QuicPacketType.INITIAL or len(data) < _SMALLEST_INITIAL:
            self.stray_packets += 1
            return None
        retry_cid = None
        if self.guard is not None:
            admitted = self._guard_initial(header, addr, now)
            if admitted is None:
                return None
            original_cid, retry_cid = admitted
        if retry_cid is None:
            quic = self._make_server_connection(header.destination_cid)
        else:
            quic = self._make_server_connection(original_cid, retry_cid)  # type: ignore[call-arg]
        link = self._register(quic, dialed=False)
        if self.guard is not None and self.guard.settings.max_pending_handshakes > 0:
            self._handshaking.add(link)
        link.address = addr
        self._route(link, header.destination_cid)
        self._handler.link_accepted(link)
        return link

    def _long_header(self, data: bytes) -> QuicHeader | None:
        """The header of a long-header packet (Initial, Handshake...); None, counted as stray, otherwise."""
        if data[0] & 0x80:
            try:
                return pull_quic_header(Buffer(data=data), host_cid_length=8)
            except ValueError:
                pass
        self.stray_packets += 1
        return None

    def _guard_initial(self, header: QuicHeader, addr: Address, now: float) -> tuple[bytes, bytes | None] | None:
        """Rate limits, pending-handshake cap and Retry for a new-connection Initial; None drops it."""
        guard = self.guard
        assert guard is not None
        if len(self._handshaking) >= guard.settings.max_pending_handshakes > 0:
            self._handshaking = {link for link in self._handshaking if link.handshaking()}
        if not guard.admit_initial(addr[0], now, len(self._handshaking)):
            return None
        if not guard.retry:
            return header.destination_cid, None
        reply, ids = guard.retry_check(header, addr, now)
        if reply is not None:
            self._sendto(reply, addr, self._arrival_source)
        return ids

    # --- events, timers, send ---------------------------------------------------------------
    def _process(self, link: Link) -> None:
        """Drain the connection's events to the handler and mark it for flushing."""
        quic = link.quic
        handler = self._handler
        while (event := quic.next_event()) is not None:
            kind = type(event)
            if kind is events.ConnectionIdIssued:
                if link.path is None:
                    self._route(link, event.connection_id)
            elif kind is events.ConnectionIdRetired:
                if self._routes.get(event.connection_id) is link:
                    del self._routes[event.connection_id]
                link.cids.discard(event.connection_id)
            elif kind is events.ConnectionTerminated:
                self._forget(link)
                handler.link_terminated(link, event)
                return
            else:
                handler.link_event(link, event)
        self._dirty[link.conn_id] = link

    def _schedule_flush(self) -> None:
        """Flush (ACKs, replies) on the next turn of the loop, after the tasks woken by what just arrived:
        the application sees a datagram before our ACK is built and sent (tens to hundreds of us)."""
        if self._dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        while self._dirty:
            _, link = self._dirty.popitem()
            self._flush(link)

    def _flush(self, link: Link) -> None:
        if link.terminated:
            return
        link.touches = 0
        self._handler.before_flush(link)
        if link.ack_now:
            link.ack_now = False
            link.quic.ack_with_next_packet(self._loop.time())
        self._send_pending(link)
        timer_at = link.quic.get_timer()
        if timer_at != link.timer_at:
            if link.timer is not None:
                link.timer.cancel()
            link.timer_at = timer_at
            link.timer = None if timer_at is None else self._loop.call_at(timer_at, self._on_timer, link)

    def _send_pending(self, link: Link) -> None:
        packets = link.quic.datagrams_to_send(now=self._loop.time())
        if link.path is not None:
            for data, _ in packets:
                link.path.send(data)
            self.relayed_packets_out += len(packets)
            return
        if len(packets) > 1 and self.gso:
            self._send_segmented(packets, link.source)
            return
        for data, addr in packets:
            self._sendto(data, addr, link.source)

    def _send_segmented(self, packets: list[tuple[bytes, Address]], source: list[tuple[int, int, bytes]] | None) -> None:
        """Runs of packets to one address, all of the first one's size but the last, in one sendmsg each."""
        count = len(packets)
        start = 0
        while start < count:
            first, addr = packets[start]
            size = len(first)
            end = start + 1
            total = size
            while end < count and end - start < _GSO_MAX_SEGMENTS:
                data, to = packets[end]
                length = len(data)
                if to != addr or length > size or total + length > _GSO_MAX_BYTES:
                    break
                total += length
                end += 1
                if length < size:
                    break  # a shorter packet can only be the last segment
            if end - start == 1:
                self._sendto(first, addr, source)
            else:
                self._sendmsg_segments([data for data, _ in packets[start:end]], size, addr, source)
            start = end

    def _sendmsg_segments(
        self, buffers: list[bytes], size: int, addr: Address, source: list[tuple[int, int, bytes]] | None
    ) -> None:
        if self._sock is None:
            return
        try:
            segment = [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
            self._sock.sendmsg(buffers, segment + source if source else segment, 0, addr)
            self.packets_out += len(buffers)
        except OSError as error:
            if error.errno in _GSO_UNSUPPORTED:  # no GSO on this path (device, kernel): plain sends from now on
                log.info("UDP GSO unavailable (%s): one sendto per packet", error)
                self.gso = False
                for data in buffers:
                    self._sendto(data, addr, source)
                return
            self.send_errors += 1
            log.debug("send to %s failed: %s", addr, error)

    def _sendto(self, data: bytes, addr: Address, source: list[tuple[int, int, bytes]] | None = None) -> None:
        if self._sock is None:
            return
        try:
            if source:
                self._sock.sendmsg([data], source, 0, addr)
            else:
                self._sock.sendto(data, addr)
            self.packets_out += 1
        except OSError as error:  # full buffer or unreachable: the datagram is lost, QUIC recovers
            self.send_errors += 1
            log.debug("send to %s failed: %s", addr, error)

    def _on_timer(self, link: Link) -> None:
        link.timer = None
        link.timer_at = None
        if link.terminated:
            return
        link.quic.handle_timer(now=self._loop.time())
        self._process(link)
        # A timer due when a packet arrives (aioquic's 1 ms ACK delay at a few thousand packets/s; epoll
        # wakes timers up to 1 ms late) runs in the same turn as the read: its flush waits behind the task
        # the packet woke, which would otherwise see its datagram only after our ACK went out.
        self._schedule_flush()


def _enable_pktinfo(sock: socket.socket) -> bool:
    """Ask for each packet's destination address (both families on a dual-stack socket); False if refused."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)  # IPv4 (and v4-mapped on a dual-stack socket)
    except OSError as error:
        log.info("no IP_PKTINFO on the wildcard socket (%s): replies leave from the kernel's source choice", error)
        return False
    return True


def _set_dont_fragment(sock: socket.socket) -> None:
    """DF on every packet, the kernel's path MTU cache ignored (RFC 9000 14: QUIC packets are never
    fragmented): a path MTU probe larger than the path fails instead of arriving in IP fragments."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE)
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_PROBE)  # IPv4 (and v4 on dual-stack)
    except OSError as error:  # pragma: no cover - not Linux
        log.info("cannot set DF on the socket (%s): path MTU probes may be fragmented", error)


def _gso_available(sock: socket.socket) -> bool:
    if os.environ.get("QUICMESH_GSO", "1") == "0" or not hasattr(socket.socket, "sendmsg"):
        return False
    try:
        sock.getsockopt(_SOL_UDP, _UDP_SEGMENT)
    except OSError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
