"""The request channel: a request and its response on one bidirectional stream, with a timeout.

The caller's side keeps pending requests per connection (failed when it is lost; resent once when the
connection lost a duplicate tie-break before the peer served it). The serving side runs the application's
handler, inline for a plain function, as a task for a coroutine, within limits.max_requests_in_flight.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quicmesh.errors import (
    MessageTooLargeError,
    PeerError,
    PeerNotConnectedError,
    RemoteError,
    RequestTimeoutError,
)
from quicmesh.protocol import wire
from quicmesh.runtime.connection import REASON_LIMIT, Connection
from quicmesh.runtime.context import Context
from quicmesh.runtime.events import RequestHandler
from quicmesh.runtime.peer import Peer

log = logging.getLogger("quicmesh.node")


class Superseded(PeerNotConnectedError):
    """A request's connection was closed as a duplicate before the peer served it (it is resent)."""


@dataclass
class PendingRequest:
    future: asyncio.Future[bytes]
    decoder: wire.ResponseDecoder


class RequestChannel:
    """Plain requests (REQUEST streams, the application's handler) and feature requests (FEATURE_REQUEST
    streams, whose tag picks the feature's handler); one set of limits and errors for both."""

    def __init__(self, ctx: Context, retired_if_idle: Callable[[Connection], None]) -> None:
        self._ctx = ctx
        self._retired_if_idle = retired_if_idle  # a retiring connection closes once its requests are done
        self.handler: RequestHandler | None = None
        #: wire.FeatureTag -> the feature's handler, same signature as the application's
        self.feature_handlers: dict[int, RequestHandler] = {}

    # --- asking -------------------------------------------------------------------------------
    async def request(self, target: Peer, data: bytes, timeout: float, tag: int = 0) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                try:
                    return await self._request_on(target, data, tag)
                except Superseded:
                    # Its connection lost a duplicate tie-break before the peer served it (the peer
                    # finishes requests it started on a losing duplicate): send it on the winner.
                    while target.usable_connection is None:
                        self._ctx.check_running()
                        await asyncio.sleep(0.01)
                    return await self._request_on(target, data, tag)
        except TimeoutError:
            raise RequestTimeoutError(f"no response from {target.name} within {timeout:g}s") from None

    async def _request_on(self, target: Peer, data: bytes, tag: int) -> bytes:
        connection = target.usable_connection
        if connection is None:
            raise PeerNotConnectedError(f"peer {target.name} is not connected")
        if tag:
            hello = connection.hello
            if hello is None or not hello.features & wire.Feature.FEATURE_STREAMS:
                raise PeerError(f"peer {target.name} runs a quicmesh version without feature requests")
        limits = self._ctx.config.limits
        if len(connection.requests) >= limits.max_requests_in_flight:
            raise PeerError(f"{len(connection.requests)} requests to {target.name} already in flight "
                            f"(limits.max_requests_in_flight)")
        quic = connection.quic
        stream_id = quic.get_next_available_stream_id(is_unidirectional=False)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        connection.requests[stream_id] = PendingRequest(future, wire.ResponseDecoder(limits.max_message_size))
        stream = wire.encode_feature_request(tag, data) if tag else wire.encode_request(data)
        quic.send_stream_data(stream_id, stream, end_stream=True)
        self._ctx.touch(connection)
        if not tag:  # the counters are the application's
            target.counters.requests_out += 1
        try:
            return await future
        finally:
            if connection.requests.pop(stream_id, None) is not None and not connection.link.terminated:
                connection.quic.stop_stream(stream_id, wire.ErrorCode.NO_ERROR)
                self._ctx.touch(connection)
                self._retired_if_idle(connection)

    def response_data(self, connection: Connection, stream_id: int, pending: PendingRequest, data: bytes,
                      end: bool) -> None:
        result = pending.decoder.feed(data, end)
        if result is None:
            return
        connection.requests.pop(stream_id, None)
        self._retired_if_idle(connection)
        status, body = result
        if pending.future.done():
            return
        if status == wire.ResponseStatus.OK:
            pending.future.set_result(body)
        elif status == wire.ResponseStatus.TOO_LARGE:
            pending.future.set_exception(MessageTooLargeError(body.decode("utf-8", "replace")))
        else:
            reason = body.decode("utf-8", "replace") or wire.ResponseStatus(status).name.lower()
            pending.future.set_exception(RemoteError(f"{connection.peer}: {reason}"))

    def stream_reset(self, connection: Connection, stream_id: int) -> None:
        pending = connection.requests.pop(stream_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(RemoteError("peer reset the request stream"))
        self._retired_if_idle(connection)

    @staticmethod
    def fail(connection: Connection, error: Exception) -> None:
        """The connection is lost or the node stops: every request waiting on it gets ``error``."""
        for pending in connection.requests.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        connection.requests.clear()

    # --- serving ------------------------------------------------------------------------------
    def serve(self, connection: Connection, stream_id: int, body: bytes, tag: int = 0) -> None:
        peer = self._ctx.peers[connection.peer or ""]
        if not tag:  # the counters are the application's
            peer.counters.requests_in += 1
        if connection.serving >= self._ctx.config.limits.max_requests_in_flight:
            peer.counters.requests_refused += 1
            self.respond(connection, stream_id, wire.ResponseStatus.OVERLOADED, b"too many requests in flight")
            return
        handler = self.feature_handlers.get(tag) if tag else self.handler
        if handler is None:
            what = f"no feature for tag {tag}" if tag else "no request handler"
            self.respond(connection, stream_id, wire.ResponseStatus.NO_HANDLER, f"peer has {what}".encode())
            return
        try:
            result = handler(connection.peer or "", body)
        except Exception as error:  # noqa: BLE001 - the caller gets it as RemoteError
            self._answer(connection, stream_id, error)
            return
        if inspect.isawaitable(result):
            connection.serving += 1
            self._ctx.spawn(self._serve_later(connection, stream_id, result))
        else:  # a plain function: answered at once, no task
            self._answer(connection, stream_id, result)

    async def _serve_later(self, connection: Connection, stream_id: int, pending: Awaitable[Any]) -> None:
        try:
            try:
                result = await pending
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the caller gets it as RemoteError
                result = error
            self._answer(connection, stream_id, result)
        finally:
            connection.serving -= 1
            self._retired_if_idle(connection)

    def _answer(self, connection: Connection, stream_id: int, result: object) -> None:
        """Respond with what the request handler returned or raised."""
        if isinstance(result, (bytes, bytearray, memoryview)):
            status, reply = wire.ResponseStatus.OK, bytes(result)
        else:
            error = result if isinstance(result, Exception) else TypeError(
                f"request handler returned {type(result).__name__}, not bytes")
            log.info("request handler failed for %s: %r", connection.peer, error)
            status = wire.ResponseStatus.HANDLER_ERROR
            reply = f"{type(error).__name__}: {error}".encode()[:REASON_LIMIT]
        hello = connection.hello
        peer_limit = hello.max_message_size if hello else self._ctx.config.limits.max_message_size
        if len(reply) > peer_limit:
            status, reply = wire.ResponseStatus.TOO_LARGE, (
                f"response of {len(reply)} bytes exceeds max_message_size ({peer_limit} bytes)".encode()
            )
        self.respond(connection, stream_id, status, reply)

    def respond(self, connection: Connection, stream_id: int, status: int, body: bytes) -> None:
        if connection.link.terminated or connection.closing:
            return
        try:
            connection.quic.send_stream_data(stream_id, wire.encode_response(status, body), end_stream=True)
        except (RuntimeError, ValueError):
            # The asker gave up (a timeout resets its stream: STOP_SENDING): aioquic refuses data on a stream
            # reset or finished. The answer has no one to go to; raising here escaped the packet loop.
            return
        self._ctx.touch(connection)
