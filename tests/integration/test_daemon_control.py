"""The control socket server and client in one process, against a stand-in node (no QUIC needed).

What matters: any client input gets an answer and never hurts the daemon, a client that does not read
cannot grow the daemon's memory, and the socket file is owner-only and cleaned up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from quicmesh.ops.control import (EVENT_QUEUE_BYTES, ControlClient, ControlError, ControlServer, NodeUnreachableError,
                              SocketInUseError)
from quicmesh.errors import PeerNotConnectedError, RemoteError, UnknownPeerError


class FakePeer:
    def __init__(self, name: str, state: str) -> None:
        self.name, self.state = name, state

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "address": "127.0.0.1:1", "counters": {}}


class NoFeatures:
    def find(self, feature_type: type) -> None:
        return None


class FakeNode:
    """Just enough of quicmesh.Node for the control server."""

    features = NoFeatures()

    name, mesh, listen_address, fingerprint = "alpha", "test", ("127.0.0.1", 4433), "sha256:" + "00" * 32
    cert_not_after = datetime.now(timezone.utc) + timedelta(days=100)

    ca_not_after = datetime.now(timezone.utc) + timedelta(days=1000)
    rejections: list[tuple[float, str, str]] = []
    rejection_count = 0

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def guard_status(self) -> None:
        return None

    def peers(self) -> list[FakePeer]:
        return [FakePeer("beta", "connected"), FakePeer("gamma", "backoff")]

    def _check(self, peer: str) -> None:
        if peer not in ("beta", "gamma"):
            raise UnknownPeerError(f"{peer!r} is not a configured peer of alpha")
        if peer == "gamma":
            raise PeerNotConnectedError("gamma is not connected")

    def send_datagram(self, peer: str, data: bytes) -> None:
        self._check(peer)
        self.sent.append((peer, data, True))

    async def send(self, peer: str, data: bytes) -> None:
        self._check(peer)
        await asyncio.sleep(0.001)
        self.sent.append((peer, data, False))

    async def request(self, peer: str, data: bytes, timeout: float = 5.0) -> bytes:
        self._check(peer)
        return data.upper()


@pytest.fixture
async def server(tmp_path: Path):
    server = ControlServer(FakeNode(), tmp_path / "ctl" / "node.sock", max_message_size=1024)
    await server.start()
    yield server
    await server.close()


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def raw_exchange(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"".join(lines))
    replies = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in lines]
    writer.close()
    return replies


async def test_socket_is_owner_only_and_removed_on_close(server: ControlServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
    await server.close()
    assert not server.path.exists()


async def test_status(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as client:
        status = await client.status()
    assert status["schema"] == 1 and status["node"] == "alpha" and status["listen"] == "127.0.0.1:4433"
    assert (status["peers_connected"], status["peers_total"], status["healthy"]) == (1, 2, False)
    assert 99 < status["cert_days_left"] < 101
    assert status["control"]["clients"] == 1


async def test_bad_input_gets_an_error_reply_and_the_connection_keeps_working(server: ControlServer) -> None:
    replies = await raw_exchange(
        server.path,
        b"{not json\n",
        b"\xff\xfe\n",
        b"[1, 2]\n",
        b'{"op": "frobnicate", "id": 7}\n',
        b'{"op": "send", "peer": 5, "data": ""}\n',
        b'{"op": "send", "peer": "beta", "data": "***"}\n',
        b'{"op": "request", "peer": "beta", "data": "", "timeout": -1}\n',
        b'{"op": "listen", "kinds": ["everything"]}\n',
        b'{"op": "reply", "request": 99, "data": ""}\n',
        b'{"op": "status", "id": "last"}\n',
    )
    assert [r["ok"] for r in replies] == [False] * 9 + [True]
    assert {r["type"] for r in replies[:9]} == {"BadRequestError"}
    assert replies[3]["id"] == 7 and "unknown op 'frobnicate'" in replies[3]["error"]
    assert replies[9]["id"] == "last" and replies[9]["status"]["node"] == "alpha"


async def test_an_overlong_line_is_refused_and_the_daemon_carries_on(server: ControlServer) -> None:
    [reply] = await raw_exchange(server.path, b'{"op": "send", "data": "' + b"A" * 200_000 + b'"}\n')
    assert not reply["ok"] and "longer than" in reply["error"]
    async with await ControlClient.connect(server.path) as client:
        assert (await client.status())["node"] == "alpha"


async def test_send_and_request_with_node_errors_as_their_own_types(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as client:
        await client.send("beta", b"\x00message")
        await client.send("beta", b"datagram", datagram=True)
        assert await client.request("beta", b"ping") == b"PING"
        with pytest.raises(UnknownPeerError, match="'zeta' is not a configured peer"):
            await client.send("zeta", b"x")
        with pytest.raises(PeerNotConnectedError):
            await client.send("gamma", b"x", datagram=True)
    assert server.node.sent == [("beta", b"\x00message", False), ("beta", b"datagram", True)]


async def test_pipelined_calls_are_matched_by_id(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as client:
        await asyncio.gather(*(client.send("beta", str(i).encode()) for i in range(300)))
    assert sorted(int(data) for _, data, _ in server.node.sent) == list(range(300))


async def test_listeners_get_what_they_asked_for(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as everything, \
            await ControlClient.connect(server.path) as datagrams:
        assert await everything.listen() == "alpha"
        await datagrams.listen(["datagram"])
        server.publish_peer("beta", "connected", None)
        server.publish_received("beta", "message", b"m")
        server.publish_received("beta", "datagram", b"d")
        events = everything.events()
        got = [await asyncio.wait_for(anext(events), 5) for _ in range(3)]
        assert [e["event"] for e in got] == ["peer", "received", "received"]
        assert base64.b64decode(got[2]["data"]) == b"d"
        only = await asyncio.wait_for(anext(datagrams.events()), 5)
        assert only["kind"] == "datagram"
    await until(lambda: not server._clients)
    server.publish_received("beta", "message", b"nobody listens")
    assert server.unclaimed == 1


async def test_a_listener_that_does_not_read_is_bounded(server: ControlServer) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(server.path))
    sock.sendall(b'{"op": "listen"}\n')
    await asyncio.sleep(0.1)
    payload = b"x" * 60_000
    for _ in range(800):  # ~64 MB of events, far more than the per-client budget
        server.publish_received("beta", "message", payload)
        await asyncio.sleep(0)
    [client] = server._clients
    assert client._event_bytes <= EVENT_QUEUE_BYTES
    assert server.events_dropped > 0
    assert server.stats()["events_dropped"] == server.events_dropped
    sock.close()
    # The daemon still answers others.
    async with await ControlClient.connect(server.path) as other:
        assert (await other.status())["control"]["events_dropped"] > 0


async def test_a_slow_listener_is_told_what_it_missed(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as client:
        await client.listen(["message"])
        [conn] = server._clients
        conn._write_lock = asyncio.Lock()
        async with conn._write_lock:  # the client cannot be written to for a while
            for i in range(5000):
                server.publish_received("beta", "message", str(i).encode())
        events = client.events()
        seen = dropped = 0
        while seen + dropped < 5000:
            event = await asyncio.wait_for(anext(events), 5)
            if event["event"] == "dropped":
                dropped += event["count"]
            else:
                seen += 1
        assert dropped == server.events_dropped > 0


async def test_requests_go_to_the_newest_serving_client_else_echo(server: ControlServer) -> None:
    assert await server.handle_request("beta", b"echo me") == b"echo me"
    async with await ControlClient.connect(server.path) as app:
        await app.call("serve")

        async def answer() -> None:
            event = await anext(app.events())
            assert event["event"] == "request" and event["peer"] == "beta"
            await app.call("reply", request=event["request"],
                           data=base64.b64encode(base64.b64decode(event["data"]) + b"!").decode())

        answering = asyncio.create_task(answer())
        assert await asyncio.wait_for(server.handle_request("beta", b"hi"), 5) == b"hi!"
        await answering
        pending = asyncio.create_task(server.handle_request("beta", b"never answered"))
        await asyncio.sleep(0.05)
    with pytest.raises(RemoteError, match="disconnected"):
        await asyncio.wait_for(pending, 5)


async def test_a_second_daemon_is_refused_and_a_stale_socket_replaced(server: ControlServer, tmp_path: Path) -> None:
    with pytest.raises(SocketInUseError, match="another node is already running"):
        await ControlServer(FakeNode(), server.path, max_message_size=1024).start()
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))
    replacement = ControlServer(FakeNode(), stale, max_message_size=1024)
    await replacement.start()
    async with await ControlClient.connect(stale) as client:
        assert (await client.status())["node"] == "alpha"
    await replacement.close()
    (tmp_path / "plain").write_text("")
    with pytest.raises(ControlError, match="is not a socket"):
        await ControlServer(FakeNode(), tmp_path / "plain", max_message_size=1024).start()


async def test_the_client_notices_the_daemon_going_away(server: ControlServer) -> None:
    client = await ControlClient.connect(server.path)
    await client.listen()
    await server.close()
    with pytest.raises(NodeUnreachableError):
        await asyncio.wait_for(anext(client.events()), 5)
    with pytest.raises(NodeUnreachableError):
        await client.status()
    await client.close()
