"""The datagram channel (runtime/datagrams.py): queueing, BATCH packing at flush, drop counters and
receive routing, on real aioquic connections (the frames handed to aioquic are read back from it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aioquic.quic import events
from hypothesis import given, settings
from hypothesis import strategies as st
from meshkit import QuicPair, RecordingQuic, ready_connection, unit_config

from quicmesh.errors import DatagramTooLargeError, PeerNotConnectedError, ProtocolError, UnknownPeerError
from quicmesh.protocol import wire
from quicmesh.runtime.context import Context
from quicmesh.runtime.datagrams import DatagramChannel
from quicmesh.runtime.events import Received
from quicmesh.runtime.inbox import Inbox
from quicmesh.runtime.peer import Peer

BURST = 32  # DATAGRAM frames the channel lets wait at aioquic with 1200-byte packets (datagrams._DATAGRAM_BURST_BYTES)
OWN_LIMIT = 1200 - 31  # max_datagram_size 1200 minus DATAGRAM_PACKET_OVERHEAD


class Side:
    """One node's datagram channel, its inbox, and its peer ``beta`` on a READY connection."""

    def __init__(self, *, batching: bool = True, peer_limit: int = OWN_LIMIT, quic: RecordingQuic | None = None,
                 **limits: int) -> None:
        self.ctx = Context(unit_config("alpha", ("beta",), **limits))
        self.ctx.state = "running"
        self.peer = self.ctx.peers["beta"] = Peer(self.ctx.config.peers[0], window=8)
        self.inbox = Inbox(self.ctx)
        self.channel = DatagramChannel(self.ctx, self.inbox)
        self.quic = quic or RecordingQuic()
        features = wire.FEATURES if batching else wire.FEATURES & ~wire.Feature.DATAGRAM_BATCH
        self.connection = ready_connection(self.quic, "beta", epoch=5, features=features,
                                           max_datagram_payload=peer_limit)
        self.peer.connection = self.connection

    def flush(self) -> list[bytes]:
        """Flush once; the DATAGRAM frames this flush handed to aioquic."""
        before = len(self.quic.datagram_frames)
        self.channel.flush(self.peer, self.connection)
        return self.quic.datagram_frames[before:]

    def inbox_items(self) -> list[Received]:
        async def take() -> list[Received]:
            return [await self.inbox.recv() for _ in range(len(self.inbox._items))]
        return asyncio.run(take())


def payloads_in(frames: list[bytes]) -> list[bytes]:
    """The APP payloads in DATAGRAM frames, in order (BATCH frames unpacked)."""
    found = []
    for frame in frames:
        for datagram in wire.decode_datagram_batch(frame) if frame[0] == wire.DatagramKind.BATCH else [frame]:
            kind, payload = wire.decode_datagram(datagram)
            assert kind == wire.DatagramKind.APP
            found.append(payload)
    return found


# --- send and flush ---------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, OWN_LIMIT), max_size=80), batching=st.booleans(),
       peer_limit=st.integers(100, OWN_LIMIT))
def test_flush_packs_in_order_within_the_peers_limit(sizes: list[int], batching: bool, peer_limit: int) -> None:
    side = Side(batching=batching, peer_limit=peer_limit)
    sent = [bytes([i % 251]) * min(size, peer_limit) for i, size in enumerate(sizes)]
    for payload in sent:
        side.channel.send("beta", payload)
    frames = side.flush()
    budget = 1 + peer_limit  # the largest DATAGRAM the peer takes, kind byte included
    assert len(frames) <= BURST
    moved = payloads_in(frames)
    assert moved == sent[: len(moved)]  # nothing lost, reordered or duplicated
    assert len(side.peer.datagram_queue) == len(sent) - len(moved)
    assert side.peer.counters.datagrams_out == len(moved)
    assert side.peer.counters.bytes_out == sum(map(len, sent))
    for i, frame in enumerate(frames):
        assert len(frame) <= budget
        if frame[0] == wire.DatagramKind.BATCH:
            assert batching and len(wire.decode_datagram_batch(frame)) >= 2  # a lone datagram goes unbatched
        if batching and i + 1 < len(frames):  # packed greedily: the next datagram did not fit
            next_entry = wire.app_batch_entry(moved[len(payloads_in(frames[: i + 1]))])
            used = len(frame) if frame[0] == wire.DatagramKind.BATCH else 1 + len(wire.batch_entry(frame))
            assert used + len(next_entry) > budget
    if len(frames) < BURST:
        assert not side.peer.datagram_queue  # only aioquic's queue limit holds datagrams back


def test_burst_limit_leaves_the_rest_queued_until_aioquic_sends() -> None:
    side = Side(batching=False)
    for i in range(100):
        side.channel.send("beta", bytes([i]))
    assert len(side.flush()) == BURST
    assert side.quic.pending_datagrams() == BURST
    assert side.flush() == []  # aioquic still holds the burst
    assert len(side.peer.datagram_queue) == 100 - BURST
    assert side.channel.backlog("beta") == 100


def test_non_batching_peer_gets_each_datagram_in_its_own_frame() -> None:
    side = Side(batching=False)
    for payload in (b"a", b"bb", b"ccc"):
        side.channel.send("beta", payload)
    assert side.flush() == [b"\x00a", b"\x00bb", b"\x00ccc"]


def test_a_lone_datagram_goes_unbatched_and_neighbours_share_a_batch() -> None:
    side = Side()
    side.channel.send("beta", b"solo")
    assert side.flush() == [b"\x00solo"]
    side.channel.send("beta", b"x")
    side.channel.send("beta", b"yz")
    assert side.flush() == [wire.encode_datagram_batch([wire.app_batch_entry(b"x"), wire.app_batch_entry(b"yz")])]


def test_queue_full_drops_are_counted_and_queued_ones_dropped_on_disconnect() -> None:
    side = Side(datagram_queue=4)
    for i in range(7):
        side.channel.send("beta", bytes([i]))
    counters = side.peer.counters
    assert counters.datagrams_dropped_queue_full == 3
    assert side.channel.send_frame("beta", wire.encode_forward_datagram(1, 2, b"p"), 1) == "queue full"
    assert counters.datagrams_dropped_queue_full == 4
    side.channel.drop_queued(side.peer)
    assert counters.datagrams_dropped_disconnected == 4 and not side.peer.datagram_queue
    assert counters.to_dict()["datagrams_dropped"] == 8


def test_send_refuses_too_large_unconnected_and_unknown_peers() -> None:
    side = Side(peer_limit=500)
    side.channel.send("beta", b"x" * 500)
    with pytest.raises(DatagramTooLargeError, match="501 bytes exceeds max_datagram_payload \\(500 bytes\\)"):
        side.channel.send("beta", b"x" * 501)
    with pytest.raises(UnknownPeerError):
        side.channel.send("gamma", b"x")
    side.connection.link.terminated = True
    with pytest.raises(PeerNotConnectedError):
        side.channel.send("beta", b"x")
    assert side.channel.send_frame("beta", b"\x01\x01\x01", 1) == "not connected"
    assert side.channel.limit(side.connection) == 500 and side.channel.max_payload == OWN_LIMIT


def test_full_budget_batches_cross_a_real_connection(tmp_path: Path) -> None:
    """The packing budget is what the peer's aioquic really takes: largest-size datagrams and batches
    filled to the limit arrive, in order, and the connection stays up."""
    pair = QuicPair(tmp_path)
    pair.exchange()
    sender = Side(quic=pair.client)
    receiver = Side(quic=pair.server)
    receiver.connection.peer = "beta"
    arrived: list[bytes] = []
    receiver.inbox.handler = lambda item: arrived.append(item.data)
    sizes = [OWN_LIMIT, 1, 2, OWN_LIMIT - 3, 600, 566, OWN_LIMIT] + [40] * 60
    sent = [bytes([i]) * size for i, size in enumerate(sizes)]
    for payload in sent:
        sender.channel.send("beta", payload)
    largest = 0
    for _ in range(20):
        sender.channel.flush(sender.peer, sender.connection)
        _, server_events = pair.exchange()
        assert not any(isinstance(event, events.ConnectionTerminated) for event in server_events)
        for event in server_events:
            if isinstance(event, events.DatagramFrameReceived):
                largest = max(largest, len(event.data))
                receiver.channel.received(receiver.connection, event.data)
        if len(arrived) == len(sent):
            break
    assert arrived == sent
    assert largest == 1 + OWN_LIMIT  # the budget was used to the byte
    assert receiver.peer.counters.datagrams_in == len(sent)


# --- receive ----------------------------------------------------------------------------------------
def test_received_routes_app_to_the_inbox_and_other_kinds_to_their_feature() -> None:
    side = Side()
    got: list[tuple[str, bytes]] = []
    side.channel.handlers[wire.DatagramKind.FORWARD] = lambda peer, datagram: got.append((peer, datagram))
    forward = wire.encode_forward_datagram(3, 4, b"udp")
    side.channel.received(side.connection, wire.encode_datagram_batch(
        [wire.app_batch_entry(b"one"), wire.batch_entry(forward), wire.app_batch_entry(b"two")]))
    side.channel.received(side.connection, wire.encode_app_datagram(b"three"))
    assert got == [("beta", forward)]
    assert [(item.peer, item.kind, item.data) for item in side.inbox_items()] == [
        ("beta", "datagram", b"one"), ("beta", "datagram", b"two"), ("beta", "datagram", b"three")]
    counters = side.peer.counters
    assert counters.datagrams_in == 3 and counters.bytes_in == 11


def test_unwanted_feature_kinds_are_checked_and_dropped() -> None:
    side = Side()
    side.channel.received(side.connection, wire.encode_forward_reply_datagram(1, 1, b"x"))  # nobody forwards
    assert side.inbox_items() == []
    with pytest.raises(ProtocolError):
        side.channel.received(side.connection, b"\x01\xff")  # truncated FORWARD header
    with pytest.raises(ProtocolError):
        side.channel.received(side.connection, b"\x7funknown")
    with pytest.raises(ProtocolError):
        side.channel.received(side.connection, b"")


def test_inbox_full_drops_are_counted_unless_a_receive_handler_takes_them() -> None:
    side = Side(max_inbox_bytes=10)
    for _ in range(4):
        side.channel.received(side.connection, wire.encode_app_datagram(b"12345"))
    assert side.inbox.dropped == 2 and side.peer.counters.datagrams_dropped_inbox_full == 2
    handled: list[Received] = []
    side.inbox.handler = handled.append
    side.channel.received(side.connection, wire.encode_app_datagram(b"12345"))
    assert [item.data for item in handled] == [b"12345"]
    assert side.peer.counters.datagrams_in == 5


def test_nothing_is_accepted_on_a_connection_that_is_not_ready() -> None:
    side = Side()
    side.connection.link.terminated = True
    side.channel.received(side.connection, b"")  # not even checked
    side.channel.received(side.connection, wire.encode_app_datagram(b"late"))
    assert side.inbox_items() == [] and side.peer.counters.datagrams_in == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_any_received_bytes_raise_only_protocol_error(data: bytes) -> None:
    side = SIDE_FOR_FUZZ
    try:
        side.channel.received(side.connection, data)
    except ProtocolError:
        pass


def _decoding_handler(peer: str, datagram: bytes) -> None:
    wire.decode_datagram(datagram)  # what a feature does with its kinds (the forwarder decodes them)


SIDE_FOR_FUZZ = Side(max_inbox_bytes=1)
SIDE_FOR_FUZZ.channel.handlers[wire.DatagramKind.FORWARD] = _decoding_handler
