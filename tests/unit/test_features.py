"""The extension seam (runtime/features.py): who owns which kind, frame and tag, and what a feature can do
through FeatureHost — end to end between alpha's and beta's real units over real aioquic connections
carried in memory (meshkit.ChannelPair)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from meshkit import ChannelPair

from quicmesh.errors import QuicmeshError
from quicmesh.protocol import wire
from quicmesh.runtime.features import FeatureBase, FeatureError

FORWARD = int(wire.DatagramKind.FORWARD)
PUBSUB = int(wire.FeatureTag.PUBSUB)


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh")


class Recorder(FeatureBase):
    """A feature that keeps what the node tells it."""

    def __init__(self, kinds: tuple[int, ...] = (), frames: tuple[type, ...] = (), tags: tuple[int, ...] = ()) -> None:
        self.datagram_kinds = frozenset(kinds)
        self.control_frames = frames
        self.feature_tags = frozenset(tags)
        self.seen: list[tuple[object, ...]] = []

    def peer_ready(self, peer: str, epoch: int) -> None:
        self.seen.append(("ready", peer, epoch))

    def peer_lost(self, peer: str, reason: str) -> None:
        self.seen.append(("lost", peer, reason))

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        self.seen.append(("datagram", peer, datagram))

    def control_received(self, peer: str, epoch: int, frame: object) -> None:
        self.seen.append(("control", peer, epoch, frame))

    def message_received(self, peer: str, tag: int, data: bytes) -> None:
        self.seen.append(("message", peer, tag, data))


# --- registration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("first", "second", "named"), [
    (Recorder(kinds=(FORWARD,)), Recorder(kinds=(FORWARD,)), "datagram kind 1"),
    (Recorder(frames=(wire.Services,)), Recorder(frames=(wire.Services,)), "frame Services"),
    (Recorder(tags=(PUBSUB,)), Recorder(tags=(PUBSUB,)), "tag 1"),
])
def test_each_kind_frame_and_tag_has_one_owner(mesh_dir: Path, first: Recorder, second: Recorder,
                                                named: str) -> None:
    host = ChannelPair(mesh_dir).alpha.features
    host.add(first)
    with pytest.raises(FeatureError, match=f"Recorder cannot have {named}: already owned or reserved"):
        host.add(second)
    host.remove(first)
    host.add(second)  # freed by remove()
    assert host.find(Recorder) is second


@pytest.mark.parametrize(("feature", "named"), [
    (Recorder(kinds=(int(wire.DatagramKind.APP),)), "datagram kind 0"),
    (Recorder(kinds=(int(wire.DatagramKind.BATCH),)), "datagram kind 3"),
    (Recorder(tags=(0,)), "tag 0"),
    (Recorder(tags=(-1,)), "tag -1"),
])
def test_reserved_kinds_and_tags_are_refused(mesh_dir: Path, feature: Recorder, named: str) -> None:
    host = ChannelPair(mesh_dir).alpha.features
    with pytest.raises(FeatureError, match=named):
        host.add(feature)
    assert host.find(Recorder) is None


def test_the_runtimes_own_control_frames_cannot_be_claimed(mesh_dir: Path) -> None:
    """The runtime handles these frames before any feature would see them: a feature claiming one would
    silently never be called, so the seam must refuse it like the reserved datagram kinds."""
    host = ChannelPair(mesh_dir).alpha.features
    accepted = []
    for frame in (wire.Hello, wire.Ack, wire.Reject, wire.GoAway):
        try:
            host.add(Recorder(frames=(frame,)))
        except FeatureError:
            continue
        accepted.append(frame.__name__)
        host.remove(host.find(Recorder))
    assert accepted == []


def test_a_refused_feature_registers_nothing(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    host = pair.alpha.features
    host.add(Recorder(tags=(PUBSUB,)))
    greedy = Recorder(kinds=(FORWARD,), frames=(wire.Services,), tags=(PUBSUB,))
    with pytest.raises(FeatureError):
        host.add(greedy)
    assert FORWARD not in pair.alpha.datagrams.handlers
    assert not host.control_received("beta", 1, wire.Services(()))
    host.add(Recorder(kinds=(FORWARD,), frames=(wire.Services,)))  # both still free


def test_remove_unplugs_every_handler(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    host = pair.alpha.features
    feature = Recorder(kinds=(FORWARD,), frames=(wire.Services,), tags=(PUBSUB,))
    host.add(feature)
    host.remove(feature)
    host.remove(feature)  # twice: nothing to do
    assert host.find(Recorder) is None
    assert FORWARD not in pair.alpha.datagrams.handlers
    assert PUBSUB not in pair.alpha.messages.feature_handlers and PUBSUB not in pair.alpha.requests.feature_handlers
    assert not host.control_received("beta", 1, wire.Services(()))


def test_find_picks_the_feature_by_type(mesh_dir: Path) -> None:
    class Other(FeatureBase):
        pass

    host = ChannelPair(mesh_dir).alpha.features
    recorder, other = Recorder(), Other()
    host.add(recorder)
    host.add(other)
    assert host.find(Recorder) is recorder and host.find(Other) is other
    assert host.find(ChannelPair) is None


def test_a_feature_added_late_is_told_of_peers_already_connected(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    late = Recorder()
    pair.alpha.features.add(late)
    assert late.seen == [("ready", "beta", pair.beta.ctx.epoch)]
    pair.alpha.lose()
    later = Recorder()
    pair.alpha.features.add(later)
    assert later.seen == []  # nobody is connected now
    assert pair.alpha.features.connected_peers() == []


# --- what a feature does through the host -------------------------------------------------------------
async def test_datagrams_and_control_frames_reach_the_peers_feature(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    receiver = Recorder(kinds=(FORWARD,), frames=(wire.Services,))
    pair.beta.features.add(receiver)
    host = pair.alpha.features
    assert host.connected_peers() == ["beta"] and host.node_name == "alpha"
    assert host.datagram_limit("beta") == 1 + 1169
    datagram = wire.encode_forward_datagram(7, 9, b"udp")
    assert host.send_datagram("beta", datagram, payload_size=3) is None
    frame = wire.Services(((7, "dns"),))
    assert host.send_control("beta", frame)
    await pair.carry()
    assert receiver.seen[1:] == [("datagram", "alpha", datagram), ("control", "alpha", pair.alpha.ctx.epoch, frame)]
    pair.alpha.lose()
    assert host.send_datagram("beta", datagram, 3) == "not connected"
    assert not host.send_control("beta", frame)


async def test_feature_messages_and_requests_through_the_host(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    receiver = Recorder(tags=(PUBSUB,))
    pair.beta.features.add(receiver)
    sent = asyncio.ensure_future(pair.alpha.features.send_message("beta", PUBSUB, b"hello"))
    await pair.carry()
    await asyncio.wait_for(sent, 5)
    assert receiver.seen[1:] == [("message", "alpha", PUBSUB, b"hello")]
    assert not pair.beta.inbox._items  # the application never sees a feature's message


@pytest.mark.parametrize("tag", [0, -1])
async def test_a_feature_cannot_send_with_a_reserved_tag(mesh_dir: Path, tag: int) -> None:
    """Tag 0 is the application's (a plain MESSAGE/REQUEST): a feature sending with it would write into the
    peer's application inbox; a negative tag has no wire encoding. The host must refuse both with a typed
    error, as it refuses to register them, and keep nothing of them in the outbox."""
    pair = ChannelPair(mesh_dir)
    sent = asyncio.ensure_future(pair.alpha.features.send_message("beta", tag, b"not for the application"))
    await pair.carry()
    with pytest.raises(QuicmeshError):
        await asyncio.wait_for(sent, 1)
    assert not pair.beta.inbox._items
    assert pair.alpha.peer.unacked == {}  # nothing left behind to resend on every later connection
    pair.reconnect()
    with pytest.raises(QuicmeshError):
        await pair.alpha.features.request("beta", tag, b"x", timeout=0.2)


def test_deliver_hands_items_to_the_application(mesh_dir: Path) -> None:
    from quicmesh.runtime.events import Received

    pair = ChannelPair(mesh_dir)
    got: list[Received] = []
    pair.beta.inbox.handler = got.append
    item = Received("alpha", "datagram", b"forwarded")
    pair.beta.features.deliver(item)
    assert got == [item]
