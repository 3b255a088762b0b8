"""The control socket: how `quicmesh status/send/request/listen` and programs in any language talk to a
running node. A Unix stream socket (owner-only), newline-delimited JSON; docs/CONTROL.md is its spec.

The daemon is the node's application: what the node receives goes to the clients that listen, and
requests from peers go to the newest client that serves them (or are echoed back, so `quicmesh
request` works as an end-to-end ping). The server never trusts its clients: a bad line gets an error
reply, and a client that stops reading loses events (counted) instead of growing the daemon's memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import importlib
import itertools
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from quicmesh.errors import (DatagramTooLargeError, InvalidSubjectError, MessageTooLargeError, NodeClosedError,
                             NoRespondersError, OutboxFullError, PeerNotConnectedError, PublishError, QuicmeshError,
                             RemoteError, RequestTimeoutError, StorageError, UnknownPeerError)
from quicmesh.ops.health import ALL_PEERS, MinPeers
from quicmesh.ops.logs import fields
from quicmesh.ops.socket_paths import MAX_SOCKET_PATH_BYTES, socket_path_fits
from quicmesh.ops.status import build_status

if TYPE_CHECKING:
    from quicmesh.config import Config
    from quicmesh.ops.view import NodeView

log = logging.getLogger(__name__)

SOCKET_ENV = "QUICMESH_CONTROL_SOCKET"  # overrides control.socket (containers mount the config read-only)
SOCKET_ENVS = ("QUICMESH_SOCKET", SOCKET_ENV)  # both names work; the first one set wins
MAX_PIPELINED = 128                      # requests of one client in progress at once; more wait their turn
EVENT_QUEUE_LINES = 4096                 # event lines buffered per client before new ones are dropped...
EVENT_QUEUE_BYTES = 16 * 1024 * 1024     # ...or this many bytes (one line is always accepted)
SERVE_TIMEOUT = 30.0                     # how long a serving client may take to answer a request
CLIENT_LINE_LIMIT = 64 * 1024 * 1024     # longest line a client accepts (a base64 max_message_size body)
REPLY_TIMEOUT = 5.0                      # a daemon silent this long (beyond the op's own timeout) is unreachable
EVENT_KINDS = ("datagram", "message", "peer")
MAX_PING_TIMEOUT = 60.0                  # seconds one `ping` op may wait for the peer's ACK


class ControlError(QuicmeshError):
    """The control socket cannot be used, or the node refused a control request."""


class NodeUnreachableError(ControlError):
    """Nothing answers on the control socket (the daemon is not running, or not as this user)."""


class SocketInUseError(ControlError):
    """Another daemon already answers on the control socket."""


class BadRequestError(ControlError):
    """A client sent a line that is not a valid request."""


# Node errors a client re-raises as the same type, so Python callers can catch them precisely.
_REMOTE_TYPES: dict[str, type[QuicmeshError]] = {cls.__name__: cls for cls in (
    UnknownPeerError, PeerNotConnectedError, DatagramTooLargeError, MessageTooLargeError,
    RequestTimeoutError, RemoteError, NodeClosedError, BadRequestError, StorageError, OutboxFullError,
    NoRespondersError, PublishError, InvalidSubjectError)}


def socket_from_environment() -> tuple[str, str] | None:
    """(variable, path) of the first of $QUICMESH_SOCKET, $QUICMESH_CONTROL_SOCKET that is set, if any."""
    return next(((name, os.environ[name]) for name in SOCKET_ENVS if os.environ.get(name)), None)


def socket_path(config: Config | None = None, explicit: str | os.PathLike[str] | None = None) -> Path:
    """Which control socket to use: ``explicit`` (--socket), else $QUICMESH_SOCKET, else
    $QUICMESH_CONTROL_SOCKET, else ``config.control.socket``."""
    environment = socket_from_environment()
    chosen = explicit or (environment[1] if environment else None) or (
        config.control.socket if config is not None else None)
    if not chosen:
        raise ControlError(f"which node? give -c node.toml or --socket PATH (or set {SOCKET_ENVS[0]})")
    path = Path(chosen)
    if not socket_path_fits(path):
        raise ControlError(f"control socket path {path} is {len(os.fsencode(path))} bytes long, more than "
                           f"the {MAX_SOCKET_PATH_BYTES} a Unix socket allows: choose a shorter control.socket "
                           f"(or set {SOCKET_ENV})")
    return path


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- server -------------------------------------------------------------------------------------
class ControlServer:
    """Serves one node's control socket; ``publish_*`` feed what the node receives to the listeners."""

    def __init__(self, node: NodeView, path: Path, *, max_message_size: int) -> None:
        self.node = node
        self.path = Path(path)
        self.started = time.time()
        # A request line carries at most one base64 body of max_message_size, plus a little JSON.
        self._line_limit = (max_message_size + 2) // 3 * 4 + 64 * 1024
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients: set[_Client] = set()
        self._responders: list[_Client] = []  # clients that answer requests; the newest answers
        self._request_ids = itertools.count(1)
        self.min_peers: MinPeers = ALL_PEERS  # the node's [health] rule, reported in the status (set on reload)
        self.events_dropped = 0   # event lines dropped because a client did not read them in time
        self.unclaimed = 0        # received datagrams/messages no client was listening for

    async def start(self) -> None:
        for module in FEATURE_MODULES:  # their control ops, however the daemon was started
            importlib.import_module(module)
        """Bind the socket owner-only; replace a stale socket file, refuse if another daemon answers."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous_umask = os.umask(0o177)  # the socket file is created 0600: only our user may connect
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot create the control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(previous_umask)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve_client, sock=sock, limit=self._line_limit)

    def _remove_stale_socket(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket: remove it or set another control.socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.path))
            except ConnectionRefusedError:
                os.unlink(self.path)
                log.info("removed a stale control socket", extra=fields(socket=str(self.path)))
                return
            except OSError as exc:
                raise ControlError(f"cannot use the control socket {self.path}: {exc.strerror}") from None
        raise SocketInUseError(f"another node is already running on the control socket {self.path}")

    async def close(self) -> None:
        """Stop accepting, disconnect every client, remove the socket file (if it is still ours)."""
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.close()
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the socket file if it is still ours (a forced exit calls this instead of ``close``)."""
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None

    def stats(self) -> dict[str, Any]:
        return {"socket": str(self.path), "clients": len(self._clients),
                "listeners": sum(1 for c in self._clients if c.kinds & {"datagram", "message"}),
                "responders": len(self._responders), "events_dropped": self.events_dropped,
                "received_unclaimed": self.unclaimed}

    def status(self) -> dict[str, Any]:
        return build_status(self.node, started=self.started, control=self.stats(), min_peers=self.min_peers)

    # --- what the node hands us ---
    def publish_received(self, peer: str, kind: str, data: bytes,
                         written: Callable[[], None] | None = None) -> bool:
        """Offer a received item to the listening clients; False if none was listening (or all were full).
        ``written`` is called once, when the first listener's copy has been written to its socket."""
        listeners = [c for c in self._clients if kind in c.kinds]
        if not listeners:
            self.unclaimed += 1
            return False
        line = encode({"event": "received", "peer": peer, "kind": kind, "data": b64encode(data)})
        once = _once(written) if written is not None else None
        return any([client.offer(line, once) for client in listeners])

    def publish_peer(self, peer: str, kind: str, reason: str | None) -> None:
        line = encode({"event": "peer", "peer": peer, "kind": kind, "reason": reason})
        for client in self._clients:
            if "peer" in client.kinds:
                client.offer(line)

    async def handle_request(self, peer: str, data: bytes) -> bytes:
        """The node's request handler: the newest serving client answers; with none, echo the data."""
        if not self._responders:
            return data
        return await self._responders[-1].ask(next(self._request_ids), peer, data)

    # --- clients ---
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(self, reader, writer)
        self._clients.add(client)
        try:
            await client.run()
        finally:
            self._clients.discard(client)
            if client in self._responders:
                self._responders.remove(client)
            client.close()


class _Client:
    """One connected control client: its requests run concurrently; its events go through a bounded queue."""

    def __init__(self, server: ControlServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.kinds: frozenset[str] = frozenset()  # event kinds this client listens to
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._events: collections.deque[tuple[bytes, Callable[[], None] | None]] = collections.deque()
        self._event_bytes = 0
        self._events_ready = asyncio.Event()
        self._dropped = 0  # drops not yet reported to this client
        self._pump: asyncio.Task[None] | None = None
        self._replies: dict[int, asyncio.Future[bytes]] = {}

    async def run(self) -> None:
        slots = asyncio.Semaphore(MAX_PIPELINED)
        while True:
            try:
                line = await self.reader.readline()
            except ValueError:  # longer than the limit: the rest of the stream cannot be trusted
                await self.write(encode({"ok": False, "type": "BadRequestError",
                                         "error": f"request line longer than {self.server._line_limit} bytes"}))
                return
            except ConnectionError:
                return
            if not line:
                return
            if line.strip():
                await slots.acquire()
                task = asyncio.create_task(self._answer(line))
                self._tasks.add(task)
                task.add_done_callback(lambda t: (self._tasks.discard(t), slots.release()))

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(RemoteError(f"the application answering requests on {self.server.node.name} "
                                                "disconnected"))
        self.writer.close()

    async def write(self, line: bytes) -> bool:
        """True once the line is in the socket (drained); False if the client is gone."""
        async with self._write_lock:
            if self.writer.is_closing():
                return False
            self.writer.write(line)
            try:
                await self.writer.drain()
            except ConnectionError:
                self.writer.close()
                return False
            return True

    async def _answer(self, line: bytes) -> None:
        """Handle one request line and write its reply (with the request's ``id``, if it had one)."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
            request = None
            reply = {"ok": False, "type": "BadRequestError", "error": f"invalid JSON: {exc}"}
        else:
            reply = await self._dispatch(request)
        if isinstance(request, dict) and request.get("id") is not None:
            reply["id"] = request["id"]
        await self.write(encode(reply))

    async def _dispatch(self, request: Any) -> dict[str, Any]:
        try:
            if not isinstance(request, dict):
                raise BadRequestError('a request must be a JSON object, e.g. {"op": "status"}')
            op = request.get("op")
            handler = _OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise BadRequestError(f"unknown op {op!r}: expected one of {', '.join(sorted(_OPS))}")
            return {"ok": True, **await handler(self, request)}
        except QuicmeshError as exc:
            return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        except Exception:  # a bug: report it to the client and the log, never take the daemon down
            log.exception("control request failed", extra=fields(op=str(request.get("op"))[:40]))
            return {"ok": False, "type": "InternalError", "error": "internal error (see the node's log)"}

    # --- events ---
    def _subscribe(self, kinds: frozenset[str]) -> None:
        self.kinds |= kinds
        if self._pump is None:
            self._pump = asyncio.create_task(self._write_events())

    def offer(self, line: bytes, written: Callable[[], None] | None = None) -> bool:
        """Queue an event line (``written`` is called once it is in the socket); drop (and count) it if this
        client is too far behind."""
        if self._events and (len(self._events) >= EVENT_QUEUE_LINES
                             or self._event_bytes + len(line) > EVENT_QUEUE_BYTES):
            self._dropped += 1
            self.server.events_dropped += 1
            return False
        self._events.append((line, written))
        self._event_bytes += len(line)
        self._events_ready.set()
        return True

    async def _write_events(self) -> None:
        while True:
            while not self._events:
                self._events_ready.clear()
                await self._events_ready.wait()
            line, written = self._events.popleft()
            self._event_bytes -= len(line)
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                await self.write(encode({"event": "dropped", "count": dropped}))
            if await self.write(line) and written is not None:
                written()

    async def ask(self, request_number: int, peer: str, data: bytes) -> bytes:
        """Pass a peer's request to this serving client and wait for its ``reply`` op."""
        reply = asyncio.get_running_loop().create_future()
        self._replies[request_number] = reply
        node = self.server.node.name
        try:
            if not self.offer(encode({"event": "request", "request": request_number, "peer": peer,
                                      "data": b64encode(data)})):
                raise RemoteError(f"the application answering requests on {node} is overloaded")
            return await asyncio.wait_for(reply, SERVE_TIMEOUT)
        except TimeoutError:
            raise RemoteError(f"the application on {node} did not answer within {SERVE_TIMEOUT:.0f}s") from None
        finally:
            self._replies.pop(request_number, None)


# --- ops: each takes the client and the request object, returns the extra fields of the reply ----
def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"{key!r} must be a non-empty string")
    return value


def _data(request: dict[str, Any]) -> bytes:
    value = request.get("data", "")
    if not isinstance(value, str):
        raise BadRequestError("'data' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise BadRequestError(f"'data' is not valid base64: {exc}") from None


def _flag(request: dict[str, Any], key: str) -> bool:
    value = request.get(key, False)
    if not isinstance(value, bool):
        raise BadRequestError(f"{key!r} must be true or false")
    return value


async def _op_status(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    return {"status": client.server.status()}


async def _op_send(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    peer, data, node = _text(request, "peer"), _data(request), client.server.node
    durable = _flag(request, "durable")  # committed to the node's outbox ([storage]), not yet delivered
    if _flag(request, "datagram"):
        if durable:
            raise BadRequestError("a datagram cannot be durable: drop 'datagram' or 'durable'")
        node.send_datagram(peer, data)
    elif durable:
        await node.send(peer, data, durable=True)
    else:
        await node.send(peer, data)
    return {}


async def _op_request(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    timeout = request.get("timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise BadRequestError("'timeout' must be a number of seconds in (0, 3600]")
    reply = await client.server.node.request(_text(request, "peer"), _data(request), timeout=timeout)
    return {"data": b64encode(reply)}


async def _op_ping(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    """One round trip to a peer through its connection; ``path`` says which way it went."""
    timeout = request.get("timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_PING_TIMEOUT:
        raise BadRequestError(f"'timeout' must be a number of seconds in (0, {MAX_PING_TIMEOUT:g}]")
    peer, node = _text(request, "peer"), client.server.node
    rtt = await node.ping(peer, timeout=timeout)
    status = next((p.to_dict() for p in node.peers() if p.name == peer), {})
    return {"rtt": rtt, "path": status.get("path") or "direct"}


async def _op_listen(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    kinds = request.get("kinds", list(EVENT_KINDS))
    if not isinstance(kinds, list) or not kinds or not set(kinds) <= set(EVENT_KINDS):
        raise BadRequestError(f"'kinds' must be a non-empty list of {', '.join(EVENT_KINDS)}")
    client._subscribe(frozenset(kinds))
    return {"node": client.server.node.name}


async def _op_serve(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    if client not in client.server._responders:
        client.server._responders.append(client)
    client._subscribe(frozenset())
    return {"node": client.server.node.name}


async def _op_reply(client: _Client, request: dict[str, Any]) -> dict[str, Any]:
    number = request.get("request")
    reply = client._replies.get(number) if isinstance(number, int) else None
    if reply is None or reply.done():
        raise BadRequestError(f"no request {number!r} is waiting for a reply (too late, or not yours)")
    error = request.get("error")
    if error is not None:
        reply.set_exception(RemoteError(str(error)))
    else:
        reply.set_result(_data(request))
    return {}


ControlOp = Callable[["_Client", dict[str, Any]], Awaitable[dict[str, Any]]]
_OPS: dict[str, ControlOp] = {
    "status": _op_status, "send": _op_send, "request": _op_request, "ping": _op_ping,
    "listen": _op_listen, "serve": _op_serve, "reply": _op_reply,
}


#: Each feature's operator module: its import registers the feature's control ops (register_ops), and its
#: ``add_commands(command, target)`` adds the feature's CLI subcommands. Light: argparse and this module only.
FEATURE_MODULES: tuple[str, ...] = ("quicmesh.durable.cli", "quicmesh.pubsub.cli", "quicmesh.membership.cli")


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            callback()

    return call


def register_ops(ops: dict[str, ControlOp]) -> None:
    """A feature adds its control ops (each ``async def op(client, request) -> dict``; ``client.server.node``
    is the node), at the import of its module in FEATURE_MODULES; a name already taken raises."""
    taken = sorted(set(ops) & set(_OPS))
    if taken:
        raise ValueError(f"control ops already defined: {', '.join(taken)}")
    _OPS.update(ops)


# --- client -------------------------------------------------------------------------------------
class ControlClient:
    """A connection to a node's control socket. Calls may run concurrently (they are matched by id);
    events (after ``listen``/``serve``) arrive through ``events()``."""

    def __init__(self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._closed_reason: str | None = None
        self._read_task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> ControlClient:
        path = Path(path)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=CLIENT_LINE_LIMIT)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NodeUnreachableError(f"cannot reach the node at {path}: is `quicmesh run` running?") from None
        except PermissionError:
            raise NodeUnreachableError(f"cannot reach the node at {path}: permission denied (the socket is "
                                       "owner-only: run this as the node's user)") from None
        except OSError as exc:
            raise NodeUnreachableError(f"cannot reach the node at {path}: {exc.strerror or exc}") from None
        return cls(path, reader, writer)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._read_task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def call(self, op: str, **request: Any) -> dict[str, Any]:
        """Send one request and return its reply; a refusal raises the node's error type."""
        if self._closed_reason:
            raise NodeUnreachableError(self._closed_reason)
        request_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            async with self._write_lock:
                self._writer.write(encode({"op": op, "id": request_id, **request}))
                await self._writer.drain()
            answer = await reply
        except ConnectionError:
            raise NodeUnreachableError(f"the node at {self.path} closed the connection") from None
        finally:
            self._pending.pop(request_id, None)
        if not answer.get("ok"):
            raise _REMOTE_TYPES.get(answer.get("type", ""), ControlError)(answer.get("error", "request refused"))
        return answer

    async def status(self) -> dict[str, Any]:
        return (await self.call("status"))["status"]

    async def send(self, peer: str, data: bytes, *, datagram: bool = False, durable: bool = False) -> None:
        """Returns when the peer acknowledged the message (a datagram: when the node queued it; a durable
        message: when the node committed it to its outbox)."""
        extra = {"durable": True} if durable else {}  # only when asked: older daemons refuse nothing
        await self.call("send", peer=peer, data=b64encode(data), datagram=datagram, **extra)

    async def request(self, peer: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        reply = await self.call("request", peer=peer, data=b64encode(data), timeout=timeout)
        return base64.b64decode(reply["data"])

    async def ping(self, peer: str, *, timeout: float = 5.0) -> tuple[float, str]:
        """(round-trip seconds, path) of one QUIC PING to ``peer``; RequestTimeoutError when lost."""
        reply = await self.call("ping", peer=peer, timeout=timeout)
        return float(reply["rtt"]), str(reply.get("path") or "direct")

    async def listen(self, kinds: list[str] | tuple[str, ...] = EVENT_KINDS) -> str:
        """Subscribe to events of these kinds (see ``events()``); returns the node's name."""
        return (await self.call("listen", kinds=list(kinds)))["node"]

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Event objects as the daemon sends them; raises NodeUnreachableError when it goes away."""
        while True:
            event = await self._events.get()
            if event is None:
                raise NodeUnreachableError(self._closed_reason or "connection closed")
            yield event

    async def _read(self) -> None:
        reason = f"the node at {self.path} closed the connection"
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError(f"not a JSON object: {line[:80]!r}")
                if "event" in message:
                    self._events.put_nowait(message)
                elif (reply := self._pending.get(message.get("id"))) is not None and not reply.done():
                    reply.set_result(message)
        except (ConnectionError, ValueError) as exc:
            reason = f"the connection to the node at {self.path} broke: {exc}"
        finally:
            self._closed_reason = reason
            for reply in self._pending.values():
                if not reply.done():
                    reply.set_exception(NodeUnreachableError(reason))
            self._events.put_nowait(None)


async def fetch_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One status document from the node at ``path``; NodeUnreachableError if it does not answer."""
    async def ask() -> dict[str, Any]:
        async with await ControlClient.connect(path) as client:
            return await client.status()

    try:
        return await asyncio.wait_for(ask(), REPLY_TIMEOUT)
    except TimeoutError:
        raise NodeUnreachableError(f"the node at {path} did not answer within {REPLY_TIMEOUT:.0f}s") from None
