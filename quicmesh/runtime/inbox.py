"""The application's side of receiving: a bounded inbox read by ``recv()``, or a receive handler."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from quicmesh.errors import NodeClosedError
from quicmesh.runtime.context import Context
from quicmesh.runtime.events import ReceiveHandler, Received

log = logging.getLogger("quicmesh.node")

_INBOX_CAPACITY = 8192


class Inbox:
    """Received datagrams and messages, until the application takes them.

    Bounded in items and in bytes (limits.max_inbox_bytes): datagrams over it are dropped and counted,
    messages are held unacknowledged by the message channel until ``recv()`` makes room.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._items: deque[Received] = deque()
        self._bytes = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.handler: ReceiveHandler | None = None
        self.dropped = 0

    def full(self) -> bool:
        return len(self._items) >= _INBOX_CAPACITY or self._bytes >= self._ctx.config.limits.max_inbox_bytes

    def deliver(self, item: Received) -> None:
        handler = self.handler
        if handler is not None:
            try:
                handler(item)
            except Exception:  # noqa: BLE001 - the application's bug must not take the node down
                log.exception("receive handler failed on a %s from %s", item.kind, item.peer)
            return
        self._items.append(item)
        self._bytes += len(item.data)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def recv(self) -> Received:
        while (item := self.take()) is None:
            await self.wait()
        return item

    def take(self) -> Received | None:
        """The next item if one is waiting (no task switch: ``received()`` drains a batch this way)."""
        items = self._items
        if not items:
            return None
        item = items.popleft()
        self._bytes -= len(item.data)
        return item

    async def wait(self) -> None:
        """Until an item may be waiting; NodeClosedError once the node stopped with none left."""
        ctx = self._ctx
        if ctx.state in ("stopping", "stopped"):
            raise NodeClosedError(f"node {ctx.name} stopped")
        await woken_from(self._waiters)

    def close(self) -> None:
        """The node stopped: wake every recv() (each raises NodeClosedError)."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


async def woken_from(waiters: deque[asyncio.Future[None]]) -> None:
    """Wait until whoever owns ``waiters`` sets our future (a cancelled wait leaves a done one behind)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        if not waiter.done():
            waiter.cancel()
