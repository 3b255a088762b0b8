"""SQLite (WAL) storage for durable messages: the outbox at the sender, the inbox and its duplicate filter at
the receiver (docs/DURABLE.md).

One writer thread owns the database connection. Every call queues an *op* to it; all ops waiting when it
wakes run in ONE transaction and ONE commit (group commit: with ``sync = "full"``, one fsync for many
concurrent sends), then the read ops run on the committed state. Results come back to the event loop as
one callback per batch. A failed batch is rolled back and every op in it fails with a StorageError naming
the file: nothing is acknowledged that was not committed.
"""

from __future__ import annotations

import asyncio
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from quicmesh.errors import StorageError

SCHEMA_VERSION = 1
_BATCH_LIMIT = 4096  # ops per transaction: bounds how long one commit holds the others
FLOOR_STEP = 256  # a sender's floor is stored (and the inbox pruned below it) when it moved this far
_SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after the row is deleted
    peer TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,                  -- unix time
    expires REAL                            -- unix time; NULL: never
);
CREATE INDEX outbox_by_peer ON outbox (peer, seq);
CREATE INDEX outbox_by_expiry ON outbox (expires) WHERE expires IS NOT NULL;
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- delivery order
    peer TEXT NOT NULL,
    origin INTEGER NOT NULL,                -- the sender's store id
    seq INTEGER NOT NULL,
    body BLOB,                              -- NULL once the application acknowledged it
    received REAL NOT NULL,
    UNIQUE (peer, origin, seq)
);
CREATE TABLE floors (
    peer TEXT NOT NULL,
    origin INTEGER NOT NULL,
    floor INTEGER NOT NULL,                 -- the sender settled every seq below it: never sent again
    PRIMARY KEY (peer, origin)
);
"""
_TABLES = {"meta", "outbox", "inbox", "floors"}


class OutboxRow(NamedTuple):
    seq: int
    body: bytes
    expires: float | None


class InboxRow(NamedTuple):
    id: int
    peer: str
    body: bytes


class Settled(NamedTuple):
    """An outbox row that left the database: whose it was and its size (for the in-memory accounting)."""

    peer: str
    size: int


@dataclass
class PeerSummary:
    messages: int
    bytes: int
    oldest: float | None  # unix time the oldest pending message was accepted


@dataclass
class Opened:
    """What the database held at open: the accounting the feature keeps in memory from then on."""

    store_id: int
    outbox: dict[str, tuple[int, int]]  # peer -> (messages, bytes)
    unacked: list[InboxRow]


class _Op:
    __slots__ = ("fn", "write", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], write: bool, future: asyncio.Future[Any]) -> None:
        self.fn, self.write, self.future = fn, write, future


class Store:
    """The database at ``path``; ``await open()`` first (StorageError naming the file if it cannot be used)."""

    def __init__(self, path: Path, sync: str = "normal", floor_step: int = FLOOR_STEP) -> None:
        if sync not in _SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(_SYNC_MODES)}, got {sync!r}")
        self.path = path
        self.sync = sync
        self.floor_step = floor_step
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._submitted: list[_Op] = []  # this loop iteration's ops, handed to the writer in one put
        self._floors: dict[tuple[str, int], int] = {}  # the writer's copy of floors it has stored
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: sqlite3.Connection | None = None
        self.commits = 0  # transactions committed (group commit: far fewer than writes)
        self.writes = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> Opened:
        if self._thread is not None:
            raise StorageError(f"{self.path}: already open")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"quicmesh-store {self.path.name}", daemon=True)
        self._thread.start()
        try:
            return await self._submit(self._open, write=False)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish every queued op, then close the database (the writer thread ends)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._hand_over()
        self._queue.put(None)
        await asyncio.to_thread(thread.join)

    def _open(self, _: sqlite3.Connection | None) -> Opened:
        path = self.path
        if not path.exists():
            try:  # owner-only: messages are the applications' data
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as error:
                raise StorageError(f"{path}: cannot create the durable-message database: "
                                   f"{error.strerror or error}") from None
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StorageError(f"{path}: cannot open the durable-message database: {error}") from None
        try:
            opened = self._prepare(connection)
        except sqlite3.Error as error:
            connection.close()
            raise StorageError(f"{path}: unusable durable-message database ({error}); the node will not "
                               f"start without it: restore it, or move it away to start empty") from None
        except StorageError:
            connection.close()
            raise
        self._connection = connection
        return opened

    def _prepare(self, connection: sqlite3.Connection) -> Opened:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StorageError(f"{self.path}: cannot use WAL mode (journal_mode is {mode})")
        connection.execute(f"PRAGMA synchronous={_SYNC_MODES[self.sync]}")
        connection.execute("BEGIN IMMEDIATE")  # fails at once on a read-only file or folder
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            tables.discard("sqlite_sequence")
            if not tables:
                for statement in _SCHEMA.split(";\n"):  # not executescript: it would commit first
                    if statement.strip():
                        connection.execute(statement)
                connection.execute("INSERT INTO meta VALUES ('schema', ?), ('store_id', ?)",
                                   (SCHEMA_VERSION, secrets.randbits(62)))
            elif tables != _TABLES:
                raise StorageError(f"{self.path}: not a quicmesh durable-message database "
                                   f"(tables: {', '.join(sorted(tables))})")
            meta = dict(connection.execute("SELECT key, value FROM meta"))
            if meta.get("schema") != SCHEMA_VERSION or "store_id" not in meta:
                raise StorageError(f"{self.path}: durable-message database of schema {meta.get('schema')!r}, "
                                   f"this quicmesh reads schema {SCHEMA_VERSION}")
            # Acknowledged inbox rows below their origin's floor are no longer needed as duplicate filter.
            connection.execute("DELETE FROM inbox WHERE body IS NULL AND seq < "
                               "(SELECT floor FROM floors WHERE floors.peer = inbox.peer AND floors.origin = inbox.origin)")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        outbox = {peer: (count, size) for peer, count, size in connection.execute(
            "SELECT peer, count(*), sum(length(body)) FROM outbox GROUP BY peer")}
        unacked = [InboxRow(*row) for row in connection.execute(
            "SELECT id, peer, body FROM inbox WHERE body IS NOT NULL ORDER BY id")]
        return Opened(meta["store_id"], outbox, unacked)

    # --- the writer thread ------------------------------------------------------------------------
    def _submit(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool = True) -> asyncio.Future[Any]:
        assert self._loop is not None
        future = self._loop.create_future()
        if self._thread is None:
            future.set_exception(StorageError(f"{self.path}: the durable-message database is closed"))
            return future
        if not self._submitted:
            self._loop.call_soon(self._hand_over)
        self._submitted.append(_Op(fn, write, future))
        return future

    def _hand_over(self) -> None:
        """One queue put per loop iteration: each put wakes the writer thread (a GIL hand-over, ~10-20 us)."""
        ops, self._submitted = self._submitted, []
        if ops:
            self._queue.put(ops)

    def _run(self) -> None:
        while True:
            ops = self._queue.get()
            if ops is None:
                break
            batch = list(ops)
            stop = False
            while len(batch) < _BATCH_LIMIT:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch += more
            self._run_batch(batch)
            if stop:
                break
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _run_batch(self, batch: list[_Op]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        writes = [op for op in batch if op.write]
        connection = self._connection
        if writes:
            if connection is None:
                error = StorageError(f"{self.path}: the durable-message database is not open")
                results += [(op.future, None, error) for op in writes]
            else:
                results += self._transaction(connection, writes)
        for op in batch:
            if op.write:
                continue
            try:
                results.append((op.future, op.fn(connection), None))  # type: ignore[arg-type]
            except StorageError as error:
                results.append((op.future, None, error))
            except Exception as error:  # noqa: BLE001 - as in _transaction
                results.append((op.future, None, StorageError(f"{self.path}: cannot read: {error}")))
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _transaction(self, connection: sqlite3.Connection, writes: list[_Op]) -> list[tuple[Any, Any, Any]]:
        try:
            connection.execute("BEGIN IMMEDIATE")
            values = [op.fn(connection) for op in writes]
            connection.execute("COMMIT")
        except Exception as error:  # noqa: BLE001 - sqlite3.Error above all; any failure must fail the batch, not the thread
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            failure = StorageError(f"{self.path}: cannot write to the durable-message database: {error}")
            return [(op.future, None, failure) for op in writes]
        self.commits += 1
        self.writes += len(writes)
        return [(op.future, value, None) for op, value in zip(writes, values)]

    # --- the outbox (sender) ----------------------------------------------------------------------
    def add(self, peer: str, body: bytes, created: float, expires: float | None) -> asyncio.Future[int]:
        """Commit a message for ``peer``; its seq."""
        return self._submit(lambda c: c.execute(
            "INSERT INTO outbox (peer, body, created, expires) VALUES (?, ?, ?, ?)",
            (peer, body, created, expires)).lastrowid)

    def settle(self, seq: int) -> asyncio.Future[Settled | None]:
        """The row left the outbox (acknowledged, refused for good, purged): what it was, None if already gone."""
        def delete(c: sqlite3.Connection) -> Settled | None:
            row = c.execute("DELETE FROM outbox WHERE seq = ? RETURNING peer, length(body)", (seq,)).fetchone()
            return Settled(*row) if row else None

        return self._submit(delete)

    def pending(self, peer: str, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """Up to ``limit`` committed rows for ``peer`` with seq > ``after``, in seq order."""
        return self._submit(lambda c: [OutboxRow(*row) for row in c.execute(
            "SELECT seq, body, expires FROM outbox WHERE peer = ? AND seq > ? ORDER BY seq LIMIT ?",
            (peer, after, limit))], write=False)

    def expire(self, now: float) -> asyncio.Future[list[Settled]]:
        """Delete every row whose TTL ran out by ``now`` (unix time)."""
        return self._submit(lambda c: [Settled(*row) for row in c.execute(
            "DELETE FROM outbox WHERE expires <= ? RETURNING peer, length(body)", (now,))])

    def purge(self, peer: str) -> asyncio.Future[list[Settled]]:
        """Delete every pending row for ``peer`` (the operator gave up on them)."""
        return self._submit(lambda c: [Settled(*row) for row in c.execute(
            "DELETE FROM outbox WHERE peer = ? RETURNING peer, length(body)", (peer,))])

    def summary(self) -> asyncio.Future[dict[str, PeerSummary]]:
        """Pending messages, bytes and the oldest one's time, per peer."""
        return self._submit(lambda c: {peer: PeerSummary(count, size, oldest) for peer, count, size, oldest in c.execute(
            "SELECT peer, count(*), sum(length(body)), min(created) FROM outbox GROUP BY peer")}, write=False)

    # --- the inbox (receiver) ---------------------------------------------------------------------
    def receive(self, peer: str, origin: int, seq: int, floor: int, body: bytes,
                now: float) -> asyncio.Future[int | None]:
        """Commit a message from ``peer``: its inbox id, or None if it is a duplicate (already here, or
        below the floor its sender declared: settled there, so already committed here once)."""
        def insert(c: sqlite3.Connection) -> int | None:
            key = (peer, origin)
            known = self._floors.get(key)
            if known is None:
                row = c.execute("SELECT floor FROM floors WHERE peer = ? AND origin = ?", key).fetchone()
                known = self._floors[key] = row[0] if row else 0
            # Stored and pruned in steps: between steps, the UNIQUE key still recognises every duplicate.
            if floor >= known + self.floor_step:
                c.execute("INSERT INTO floors VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET floor = excluded.floor",
                          (peer, origin, floor))
                c.execute("DELETE FROM inbox WHERE peer = ? AND origin = ? AND seq < ? AND body IS NULL",
                          (peer, origin, floor))
                known = self._floors[key] = floor
            if seq < known:
                return None
            cursor = c.execute("INSERT OR IGNORE INTO inbox (peer, origin, seq, body, received) VALUES (?, ?, ?, ?, ?)",
                               (peer, origin, seq, body, now))
            return cursor.lastrowid if cursor.rowcount else None

        return self._submit(insert)

    def ack(self, inbox_id: int) -> asyncio.Future[bool]:
        """The application handled it: drop its body, keep its id as a duplicate filter entry. False if it
        was acknowledged before."""
        return self._submit(lambda c: c.execute(
            "UPDATE inbox SET body = NULL WHERE id = ? AND body IS NOT NULL", (inbox_id,)).rowcount > 0)


def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():  # the caller stopped waiting (cancelled)
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
