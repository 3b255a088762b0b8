"""What a subscriber holds: a :class:`Subscription` (an async iterator of :class:`Msg`, or a handler) and
the messages themselves, which carry the way to answer when they are requests."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quicmesh.errors import QuicmeshError
from quicmesh.runtime.inbox import woken_from

if TYPE_CHECKING:
    from quicmesh.pubsub.feature import PubSub

log = logging.getLogger("quicmesh.pubsub")


class Msg:
    """A message on a subject: ``peer`` is the node that published it (this node's own name for a local
    publish). A request's message has :attr:`is_request` and is answered with :meth:`respond`."""

    __slots__ = ("subject", "data", "peer", "_reply")

    def __init__(self, subject: str, data: bytes, peer: str, reply: asyncio.Future[bytes] | None = None) -> None:
        self.subject = subject
        self.data = data
        self.peer = peer
        self._reply = reply

    def __repr__(self) -> str:
        kind = "request" if self._reply is not None else "message"
        return f"Msg({kind} on {self.subject!r} from {self.peer}, {len(self.data)} bytes)"

    @property
    def is_request(self) -> bool:
        return self._reply is not None

    def respond(self, data: bytes) -> None:
        """Answer a request (once). QuicmeshError if this is no request or it was answered or timed out."""
        if self._reply is None:
            raise QuicmeshError(f"the message on {self.subject!r} is not a request: nothing to respond to")
        if self._reply.done():
            raise QuicmeshError(f"the request on {self.subject!r} was already answered or timed out")
        self._reply.set_result(bytes(data))

    def fail(self, error: Exception) -> None:
        """Answer a request with an error (the caller gets RemoteError)."""
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)


#: A handler subscription's callback: for a request, what it returns (bytes, or an awaitable of bytes) is
#: the response (None: it calls msg.respond itself); for a plain message the result is ignored.
#: Exceptions are logged (and a request's caller gets them as RemoteError).
Handler = Callable[[Msg], "bytes | Awaitable[bytes] | None"]


class Subscription:
    """Messages on ``pattern`` (for ``queue``: only those given to this member of the group).

    ``async for msg in sub`` until :meth:`close` (or ``async with``). At most ``max_pending`` wait unread:
    over it, datagrams are dropped (:attr:`dropped`) and reliable messages wait unacknowledged, so their
    senders slow down. With a ``handler`` nothing waits: it is called as each message arrives (inside the
    node's packet processing: be quick; a coroutine result runs as a task).
    """

    def __init__(self, owner: PubSub, pattern: str, queue: str | None, handler: Handler | None,
                 max_pending: int, order: int) -> None:
        self._owner = owner
        self.pattern = pattern
        self.queue = queue
        self.handler = handler
        self.max_pending = max_pending
        self.order = order  # creation order: a stable round robin among a node's members
        self.delivered = 0
        self.dropped = 0
        self.closed = False
        self._items: deque[Msg] = deque()
        self._readers: deque[asyncio.Future[None]] = deque()
        self._room: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        group = f" queue {self.queue}" if self.queue else ""
        return f"Subscription({self.pattern!r}{group}, {len(self._items)} pending)"

    @property
    def pending(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return self.handler is None and len(self._items) >= self.max_pending

    def offer(self, msg: Msg) -> bool:
        """Hand over ``msg`` now; False (counted as dropped) if the subscription is full or closed."""
        if self.closed or self.full():
            self.dropped += 1
            return False
        self.delivered += 1
        if self.handler is not None:
            self._call(msg)
            return True
        self._items.append(msg)
        _wake_one(self._readers)
        return True

    async def wait_room(self) -> None:
        """Until :meth:`offer` would take a message (or the subscription closed)."""
        while self.full() and not self.closed:
            await woken_from(self._room)

    def _call(self, msg: Msg) -> None:
        assert self.handler is not None
        try:
            result = self.handler(msg)
        except Exception as error:  # noqa: BLE001 - the application's bug must not take the node down
            log.exception("subscription handler for %r failed on %r", self.pattern, msg)
            msg.fail(error)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(msg, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif msg.is_request and result is not None:  # None: it responds itself (or the caller times out)
            _answer(msg, result)

    async def _finish(self, msg: Msg, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Exception as error:  # noqa: BLE001 - logged; a request's caller gets it as RemoteError
            log.info("subscription handler for %r failed on %r: %r", self.pattern, msg, error)
            msg.fail(error)
            return
        if msg.is_request and result is not None:
            _answer(msg, result)

    # --- reading ------------------------------------------------------------------------------
    async def next(self) -> Msg:
        """The next message; StopAsyncIteration once closed and drained."""
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            await woken_from(self._readers)
        msg = self._items.popleft()
        _wake_one(self._room)
        return msg

    def __aiter__(self) -> AsyncIterator[Msg]:
        return self

    async def __anext__(self) -> Msg:
        return await self.next()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Unsubscribe: peers are told; messages already waiting can still be read, then iteration ends."""
        if self.closed:
            return
        self.closed = True
        self._owner.unsubscribe(self)
        for waiters in (self._readers, self._room):
            while waiters:
                _wake_one(waiters)
        for task in self._tasks:
            task.cancel()


def _answer(msg: Msg, result: object) -> None:
    if isinstance(result, (bytes, bytearray, memoryview)):
        msg.respond(bytes(result))
    else:
        msg.fail(TypeError(f"the handler for {msg.subject!r} returned {type(result).__name__}, not bytes"))


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return
