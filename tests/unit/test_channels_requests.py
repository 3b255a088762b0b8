"""The request channel (runtime/requests.py): plain and feature-tag requests, handler outcomes, limits,
timeouts and lost connections, between alpha's and beta's real channels over real aioquic connections
carried in memory (meshkit.ChannelPair)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from meshkit import ChannelPair, with_limits

from quicmesh.errors import MessageTooLargeError, PeerError, PeerNotConnectedError, RemoteError, RequestTimeoutError
from quicmesh.protocol import wire
from quicmesh.runtime.features import FeatureBase

TAG = int(wire.FeatureTag.DURABLE)


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh")


async def ask(pair: ChannelPair, data: bytes, *, tag: int = 0, timeout: float = 5.0) -> bytes:
    """alpha's request to beta, with the packets carried until it is answered."""
    request = asyncio.ensure_future(pair.alpha.requests.request(pair.alpha.peer, data, timeout, tag))
    for _ in range(200):  # bounded: 200 x 5 ms
        await pair.carry()
        if request.done():
            break
        await asyncio.sleep(0.005)
    return await request


class Upper(FeatureBase):
    """A feature answering its requests in upper case, at once or from a coroutine."""

    feature_tags = frozenset({TAG})

    def request_received(self, peer: str, tag: int, data: bytes):  # noqa: ANN201 - bytes or an awaitable
        if data.startswith(b"async"):
            async def later() -> bytes:
                await asyncio.sleep(0)
                return data.upper()
            return later()
        if data == b"fail":
            raise LookupError("nothing here")
        return data.upper()


async def test_sync_and_async_handlers_answer(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)

    async def slow(peer: str, data: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return peer.encode() + b":" + data

    pair.beta.requests.handler = lambda peer, data: data[::-1]
    assert await ask(pair, b"abc") == b"cba"
    pair.beta.requests.handler = slow
    assert await ask(pair, b"x") == b"alpha:x"
    assert pair.alpha.peer.counters.requests_out == 2 and pair.beta.peer.counters.requests_in == 2
    assert pair.beta.connection is not None and pair.beta.connection.serving == 0


async def test_handler_failures_reach_the_caller_as_remote_errors(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    with pytest.raises(RemoteError, match="beta: peer has no request handler"):
        await ask(pair, b"x")

    def broken(peer: str, data: bytes) -> bytes:
        raise ValueError("boom")

    pair.beta.requests.handler = broken
    with pytest.raises(RemoteError, match="beta: ValueError: boom"):
        await ask(pair, b"x")
    pair.beta.requests.handler = lambda peer, data: 42
    with pytest.raises(RemoteError, match="TypeError: request handler returned int, not bytes"):
        await ask(pair, b"x")


async def test_feature_requests_go_to_the_feature_of_their_tag(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    pair.beta.requests.handler = lambda peer, data: b"application"
    with pytest.raises(RemoteError, match=f"peer has no feature for tag {TAG}"):
        await ask(pair, b"x", tag=TAG)
    pair.beta.features.add(Upper())
    assert await ask(pair, b"sync", tag=TAG) == b"SYNC"
    assert await ask(pair, b"async", tag=TAG) == b"ASYNC"
    with pytest.raises(RemoteError, match="beta: LookupError: nothing here"):
        await ask(pair, b"fail", tag=TAG)
    assert await ask(pair, b"plain") == b"application"  # tag 0 is the application's


async def test_feature_requests_to_a_peer_without_feature_streams_fail(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, beta_features=wire.Feature.DATAGRAM_BATCH)
    with pytest.raises(PeerError, match="without feature requests"):
        await ask(pair, b"x", tag=TAG)


async def test_requests_in_flight_are_bounded_on_both_sides(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir, max_requests_in_flight=2)
    release = asyncio.Event()

    async def held(peer: str, data: bytes) -> bytes:
        await release.wait()
        return data

    pair.beta.requests.handler = held
    first = [asyncio.ensure_future(pair.alpha.requests.request(pair.alpha.peer, b"%d" % i, 5, 0)) for i in range(2)]
    await pair.carry()
    with pytest.raises(PeerError, match="2 requests to beta already in flight"):
        await pair.alpha.requests.request(pair.alpha.peer, b"third", 5, 0)
    pair.beta.ctx.config = with_limits(pair.beta.ctx.config, max_requests_in_flight=1)  # beta serves fewer
    pair.alpha.ctx.config = with_limits(pair.alpha.ctx.config, max_requests_in_flight=3)
    with pytest.raises(RemoteError, match="too many requests in flight"):
        await ask(pair, b"third")
    assert pair.beta.peer.counters.requests_refused == 1
    release.set()
    for _ in range(5):
        await pair.carry()
    assert await asyncio.wait_for(asyncio.gather(*first), 5) == [b"0", b"1"]


async def test_no_answer_in_time_is_a_timeout_and_frees_the_slot(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    never = asyncio.Event()

    async def silent(peer: str, data: bytes) -> bytes:
        await never.wait()
        return b""

    pair.beta.requests.handler = silent
    with pytest.raises(RequestTimeoutError, match="no response from beta within 0.05s"):
        await ask(pair, b"x", timeout=0.05)
    assert pair.alpha.connection is not None and pair.alpha.connection.requests == {}


async def test_a_lost_connection_or_a_reset_stream_fails_the_request(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    never = asyncio.Event()
    served: list[int] = []

    async def silent(peer: str, data: bytes) -> bytes:
        await never.wait()
        return b""

    pair.beta.requests.handler = silent
    request = asyncio.ensure_future(pair.alpha.requests.request(pair.alpha.peer, b"x", 5, 0))
    await pair.carry()
    pair.alpha.lose()
    with pytest.raises(PeerNotConnectedError, match="connection lost"):
        await request
    with pytest.raises(PeerNotConnectedError, match="peer beta is not connected"):
        await pair.alpha.requests.request(pair.alpha.peer, b"x", 5, 0)

    pair.reconnect()
    pair.beta.requests.handler = lambda peer, data: served.append(1) or silent(peer, data)
    request = asyncio.ensure_future(pair.alpha.requests.request(pair.alpha.peer, b"x", 5, 0))
    await pair.carry()
    assert served == [1]
    pair.quic.server.reset_stream(0, wire.ErrorCode.INTERNAL)  # beta gives up on the request's stream
    await pair.carry()
    with pytest.raises(RemoteError, match="peer reset the request stream"):
        await asyncio.wait_for(request, 5)


async def test_a_response_over_the_callers_limit_is_refused_as_too_large(mesh_dir: Path) -> None:
    pair = ChannelPair(mesh_dir)
    beta = pair.beta.connection
    assert beta is not None and beta.hello is not None
    beta.hello = dataclasses.replace(beta.hello, max_message_size=10)  # what alpha's Hello said it takes
    pair.beta.requests.handler = lambda peer, data: b"x" * 11
    with pytest.raises(MessageTooLargeError, match="response of 11 bytes exceeds max_message_size \\(10 bytes\\)"):
        await ask(pair, b"q")
