"""The reliable-message channel (runtime/messages.py) and its duplicate filter (runtime/peer.py): alpha's
and beta's real channels over real aioquic connections carried in memory (meshkit.ChannelPair), so a
reconnect loses exactly what had not crossed yet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshkit import ChannelPair, ChannelNode

from quicmesh.errors import MessageTooLargeError, PeerError, RemoteError, UnknownPeerError
from quicmesh.protocol import wire
from quicmesh.runtime.peer import DuplicateFilter

TAG = int(wire.FeatureTag.PUBSUB)


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh")  # QuicPair bootstraps alpha and beta here once


async def taken(node: ChannelNode) -> list[bytes]:
    """Everything in the node's inbox, taken as Node.recv() does (making room unparks held messages)."""
    bodies = []
    while node.inbox._items:
        bodies.append((await node.inbox.recv()).data)
        node.messages.unpark()
    return bodies


# --- the duplicate filter ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), max_size=120))
def test_duplicate_filter_matches_a_set_of_ids_per_epoch(steps: list[tuple[int, int]]) -> None:
    """seen(epoch, id) then record(id) as the channel calls them, against a plain set that a new epoch empties."""
    dedupe = DuplicateFilter()
    model_epoch: int | None = None
    delivered: set[int] = set()
    for epoch, message_id in steps:
        if epoch != model_epoch:
            model_epoch, delivered = epoch, set()
        assert dedupe.seen(epoch, message_id) == (message_id in delivered)
        dedupe.record(message_id)
        delivered.add(message_id)
        assert dedupe.floor == min(set(range(max(delivered) + 2)) - delivered)  # compact: ids below floor dropped
        assert all(i > dedupe.floor for i in dedupe.above)


# --- sending ---------------------------------------------------------------------------------------
async def test_ids_count_up_and_send_returns_once_the_peer_accepted(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    sends = [asyncio.ensure_future(pair.alpha.messages.send("beta", body)) for body in (b"a", b"b", b"c")]
    await pair.carry(acks=False)
    assert sorted(pair.alpha.peer.unacked) == [0, 1, 2]
    assert not any(send.done() for send in sends)  # delivered, but not acknowledged yet
    assert [item.data for item in pair.beta.inbox._items] == [b"a", b"b", b"c"]
    await pair.carry()
    await asyncio.gather(*sends)
    assert pair.alpha.peer.unacked == {} and pair.alpha.peer.unacked_bytes == 0
    assert pair.alpha.peer.counters.messages_out == 3 and pair.beta.peer.counters.messages_in == 3


async def test_the_window_holds_back_sends_until_acks_come(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, message_window=2)
    sends = [asyncio.ensure_future(pair.alpha.messages.send("beta", bytes([i]))) for i in range(5)]
    await pair.carry(acks=False)
    assert len(pair.alpha.peer.unacked) == 2 and len(pair.beta.inbox._items) == 2
    for _ in range(5):
        await pair.carry()
    await asyncio.wait_for(asyncio.gather(*sends), 5)
    assert [item.data for item in pair.beta.inbox._items] == [bytes([i]) for i in range(5)]


async def test_unacknowledged_messages_are_resent_on_the_next_connection_and_delivered_once(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    first = asyncio.ensure_future(pair.alpha.messages.send("beta", b"lost in flight"))
    await asyncio.sleep(0)
    pair.reconnect()  # nothing crossed
    second = asyncio.ensure_future(pair.alpha.messages.send("beta", b"delivered, ack lost"))
    await pair.carry(acks=False)
    assert len(pair.beta.inbox._items) == 2
    pair.reconnect()  # beta's acks never left
    await pair.carry()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert [item.data for item in pair.beta.inbox._items] == [b"lost in flight", b"delivered, ack lost"]
    assert pair.beta.peer.counters.messages_in == 2


async def test_a_repeated_ack_or_reject_settles_nothing_twice(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, message_window=1)
    alpha = pair.alpha
    send = asyncio.ensure_future(alpha.messages.send("beta", b"x"))
    await pair.carry()
    await send
    connection = alpha.connection
    assert connection is not None
    alpha.messages.acked(connection, [0, 0])
    alpha.messages.rejected(connection, wire.Reject(0, wire.ErrorCode.REFUSED, "late"))
    # the window (1) was released once: one more send goes out, a second waits
    sends = [asyncio.ensure_future(alpha.messages.send("beta", b"y")) for _ in range(2)]
    await pair.carry(acks=False)
    assert sorted(alpha.peer.unacked) == [1]
    await pair.carry()
    await pair.carry()
    await asyncio.wait_for(asyncio.gather(*sends), 5)


async def test_rejections_fail_the_send_with_the_peers_reason(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    alpha, connection = pair.alpha, pair.alpha.connection
    assert connection is not None
    too_large = asyncio.ensure_future(alpha.messages.send("beta", b"1"))
    refused = asyncio.ensure_future(alpha.messages.send("beta", b"2"))
    await asyncio.sleep(0)
    alpha.messages.rejected(connection, wire.Reject(0, wire.ErrorCode.MESSAGE_TOO_LARGE, "too big here"))
    alpha.messages.rejected(connection, wire.Reject(1, wire.ErrorCode.REFUSED, "no thanks"))
    with pytest.raises(MessageTooLargeError, match="peer beta refused the message: too big here"):
        await too_large
    with pytest.raises(RemoteError, match="no thanks"):
        await refused
    assert alpha.peer.unacked == {} and alpha.peer.unacked_bytes == 0


async def test_size_limits_are_ours_or_the_peers_smaller_one(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, max_message_size=100)
    with pytest.raises(MessageTooLargeError, match="exceeds the local max_message_size \\(100 bytes\\)"):
        await pair.alpha.messages.send("beta", b"x" * 101)
    with pytest.raises(UnknownPeerError):
        await pair.alpha.messages.send("gamma", b"x")


# --- receiving: parking while the inbox is full ------------------------------------------------------
async def test_a_full_inbox_parks_messages_unacknowledged_and_unparks_them_in_order(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, max_inbox_bytes=4)
    sends = [asyncio.ensure_future(pair.alpha.messages.send("beta", body)) for body in (b"1111", b"22", b"33")]
    await pair.carry()
    assert sends[0].done() and not sends[1].done() and not sends[2].done()  # held ones are not acknowledged
    assert pair.beta.messages.parked
    assert await taken(pair.beta) == [b"1111", b"22", b"33"]
    await pair.carry()
    await asyncio.wait_for(asyncio.gather(*sends), 5)


async def test_held_messages_of_a_lost_connection_come_again_once(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, max_inbox_bytes=1)
    sends = [asyncio.ensure_future(pair.alpha.messages.send("beta", body)) for body in (b"a", b"b")]
    await pair.carry()
    assert pair.beta.messages.parked
    pair.reconnect()  # "b" was held, never acknowledged: dropped here, resent by alpha
    assert not pair.beta.messages.parked
    await pair.carry()
    assert await taken(pair.beta) == [b"a", b"b"]
    await pair.carry()
    await asyncio.wait_for(asyncio.gather(*sends), 5)


# --- feature messages --------------------------------------------------------------------------------
async def test_feature_handlers_accept_refuse_or_accept_later(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    release = asyncio.Event()
    got: list[bytes] = []

    def handler(peer: str, data: bytes):  # noqa: ANN202 - None, an awaitable, or raises
        got.append(data)
        if data == b"later":
            return release.wait()
        if data == b"bad":
            raise ValueError("no thanks")
        return None

    pair.beta.messages.feature_handlers[TAG] = handler
    send = pair.alpha.messages.send
    now, later, bad = (asyncio.ensure_future(send("beta", body, TAG)) for body in (b"now", b"later", b"bad"))
    nobody = asyncio.ensure_future(send("beta", b"?", TAG + 1))
    await pair.carry()
    await asyncio.wait_for(now, 5)
    with pytest.raises(RemoteError, match="refused the message: ValueError: no thanks"):
        await asyncio.wait_for(bad, 5)
    with pytest.raises(RemoteError, match=f"this node has no feature for tag {TAG + 1}"):
        await asyncio.wait_for(nobody, 5)
    assert not later.done()  # acknowledged only once its awaitable completes
    release.set()
    await pair.carry()
    await asyncio.wait_for(later, 5)
    assert got == [b"now", b"later", b"bad"] and not pair.beta.inbox._items  # never the application's


async def test_a_feature_message_resent_while_its_handler_runs_is_not_handled_twice(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    release = asyncio.Event()
    calls: list[bytes] = []
    pair.beta.messages.feature_handlers[TAG] = lambda peer, data: calls.append(data) or release.wait()
    send = asyncio.ensure_future(pair.alpha.messages.send("beta", b"slow", TAG))
    await pair.carry()
    pair.reconnect()  # the resend arrives while the handler still runs
    await pair.carry()
    assert calls == [b"slow"]
    release.set()
    await pair.carry()
    await pair.carry()
    # Handled once; its acknowledgement must reach alpha on the connection that is up now, without waiting
    # for yet another reconnect to resend it.
    await asyncio.wait_for(send, 1)
    assert calls == [b"slow"]


async def test_feature_messages_to_a_peer_without_feature_streams_fail(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, alpha_features=wire.Feature.DATAGRAM_BATCH, beta_features=wire.Feature.DATAGRAM_BATCH)
    with pytest.raises(PeerError, match="without feature messages"):
        await asyncio.wait_for(pair.alpha.messages.send("beta", b"x", TAG), 5)
    assert pair.alpha.peer.unacked == {}


# --- exactly once to the application, whatever happens to the connection ------------------------------
EVENTS = st.lists(st.sampled_from(["send", "send", "deliver", "ack", "reconnect", "recv"]), max_size=25)


@settings(max_examples=40, deadline=None)
@given(events=EVENTS, window=st.integers(1, 4), inbox_bytes=st.sampled_from([2, 6, 1 << 20]))
def test_every_message_reaches_the_application_exactly_once(mesh_dir: Path, events: list[str], window: int,
                                                           inbox_bytes: int) -> None:
    """Sends, partial carrying (messages without their acks), reconnects that lose what had not crossed,
    and a slow application: no body is ever delivered twice, none acknowledged before it was delivered,
    and once the connection is stable every send completes with its body delivered once."""

    async def scenario() -> None:
        pair = ChannelPair(mesh_dir, message_window=window, max_inbox_bytes=inbox_bytes)
        sends: dict[bytes, asyncio.Future[None]] = {}
        delivered: list[bytes] = []

        def check() -> None:
            now = delivered + [item.data for item in pair.beta.inbox._items]
            assert len(now) == len(set(now)), now
            for body, send in sends.items():
                if send.done():
                    assert send.exception() is None and body in now
        for event in events:
            if event == "send":
                body = b"m%02d" % len(sends)
                sends[body] = asyncio.ensure_future(pair.alpha.messages.send("beta", body))
                await asyncio.sleep(0)
            elif event == "deliver":
                await pair.carry(acks=False)
            elif event == "ack":
                await pair.carry()
            elif event == "reconnect":
                pair.reconnect()
            elif pair.beta.inbox._items:
                delivered.append((await pair.beta.inbox.recv()).data)
                pair.beta.messages.unpark()
            check()
        pair.reconnect()
        for _ in range(4 * len(sends) + 2):
            await pair.carry()
            while pair.beta.inbox._items:
                delivered.append((await pair.beta.inbox.recv()).data)
                pair.beta.messages.unpark()
            check()
            if all(send.done() for send in sends.values()):
                break
        assert all(send.done() for send in sends.values())
        assert sorted(delivered) == sorted(sends)

    asyncio.run(scenario())
