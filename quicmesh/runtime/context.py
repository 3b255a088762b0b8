"""What every runtime part shares: the live config, the peers, and the few node services they call."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quicmesh.config import Config
from quicmesh.errors import NodeClosedError, UnknownPeerError

if TYPE_CHECKING:
    from quicmesh.runtime.connection import Connection
    from quicmesh.runtime.peer import Peer

log = logging.getLogger("quicmesh.node")


class Context:
    """Shared by the node's parts, so that none of them holds the Node itself.

    ``config`` is replaced on reload; ``touch`` asks the endpoint to flush a connection at the end of this
    loop iteration (set once the endpoint exists).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.epoch = secrets.randbits(62)  # this node process: peers tell a restart from a reconnect by it
        self.peers: dict[str, Peer] = {}
        self.state = "new"  # new, running, stopping, stopped
        self.touch: Callable[[Connection], None] = _no_endpoint
        #: called with a peer's name when the application addresses a known peer that is not connected
        #: (on-demand membership dials it then); None: every peer is dialed anyway
        self.on_demand: Callable[[str], None] | None = None
        self.listen_address: tuple[str, int] | None = None  # bound at start
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return self.config.node.name

    @property
    def running(self) -> bool:
        return self.state == "running"

    def check_running(self) -> None:
        if self.state != "running":
            raise NodeClosedError(f"node {self.name} is {self.state}")

    def peer_or_raise(self, name: str) -> Peer:
        peer = self.peers.get(name)
        if peer is None:
            raise UnknownPeerError(f"{name!r} is not a configured peer or known member of {self.name}")
        if peer.connection is None and self.on_demand is not None:
            self.on_demand(name)
        return peer

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed", exc_info=task.exception())


def _no_endpoint(connection: Connection) -> None:
    """Before start there is nothing to flush."""
