"""The durable-message store (quicmesh/durable/store.py) against a model, and the DURABLE frame codec.

Hypothesis drives sequences of send / settle / receive (with the sender's floor) / application ack /
restart (close and reopen) / crash (a writer that dies inside its transaction: nothing of it survives) and
checks after each step that the database says what the model says: pending outbox rows, duplicates
recognised, unacknowledged inbox rows redelivered after a reopen, acknowledged ones never again.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quicmesh.durable.frame import decode_durable, encode_durable
from quicmesh.durable.store import Store
from quicmesh.errors import ProtocolError, StorageError

PEERS = ("beta", "gamma")

# (op, peer index, value): send a body / settle the n-th pending row / receive seq / ack the n-th unacked /
# raise the floor / restart / crash
events = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.binary(max_size=8)),
    st.tuples(st.just("settle"), st.integers(0, 1), st.integers(0, 20)),
    st.tuples(st.just("receive"), st.integers(0, 1), st.integers(1, 12)),
    st.tuples(st.just("ack"), st.integers(0, 1), st.integers(0, 20)),
    st.tuples(st.just("floor"), st.integers(0, 1), st.integers(1, 12)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
    st.tuples(st.just("crash"), st.just(0), st.just(0)),
), max_size=40)


def _crash_inside_a_transaction(path: Path) -> None:
    """A writer that dies mid-transaction: its rows are written to the WAL file but never committed."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("INSERT INTO outbox (peer, body, created) VALUES ('beta', x'00', 0)")
    connection.execute("INSERT INTO inbox (peer, origin, seq, body, received) VALUES ('beta', 1, 999, x'00', 0)")
    connection.close()  # no COMMIT: what kill -9 leaves behind


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=events)
def test_store_matches_the_model_across_restarts_and_crashes(tmp_path_factory: pytest.TempPathFactory,
                                                           steps: list[tuple[str, int, object]]) -> None:
    path = tmp_path_factory.mktemp("store") / "state.db"

    async def run() -> None:
        store = Store(path, "normal", floor_step=1)
        opened = await store.open()
        origin = 7
        outbox: dict[int, tuple[str, bytes]] = {}  # seq -> (peer, body): the model's pending rows
        inbox: dict[tuple[str, int], int | None] = {}  # (peer, seq) -> inbox id while unacked, None once acked
        unacked: dict[int, bytes] = {}  # inbox id -> body
        floors = {peer: 0 for peer in PEERS}
        for op, index, value in steps:
            peer = PEERS[index]
            if op == "send":
                seq = await store.add(peer, value, time.time(), None)
                assert seq not in outbox and all(seq > old for old in outbox)
                outbox[seq] = (peer, value)
            elif op == "settle" and outbox:
                seq = sorted(outbox)[value % len(outbox)]
                settled = await store.settle(seq)
                assert settled is not None and settled.peer == outbox[seq][0]
                del outbox[seq]
                assert await store.settle(seq) is None
            elif op == "receive":
                seq = value  # below the floor: settled at the sender, so already taken (or given up)
                body = b"%d" % seq
                got = await store.receive(peer, origin, seq, floors[peer], body, time.time())
                if (peer, seq) in inbox or seq < floors[peer]:
                    assert got is None  # a duplicate is recognised
                else:
                    assert got is not None
                    inbox[(peer, seq)] = got
                    unacked[got] = body
            elif op == "floor":
                floors[peer] = max(floors[peer], value)  # the next receive carries it
            elif op == "ack" and unacked:
                inbox_id = sorted(unacked)[value % len(unacked)]
                assert await store.ack(inbox_id) is True
                assert await store.ack(inbox_id) is False
                del unacked[inbox_id]
            elif op in ("restart", "crash"):
                await store.close()
                if op == "crash":
                    _crash_inside_a_transaction(path)
                store = Store(path, "normal", floor_step=1)
                reopened = await store.open()
                assert reopened.store_id == opened.store_id
                assert [(row.id, row.body) for row in reopened.unacked] == sorted(unacked.items())
                expected: dict[str, tuple[int, int]] = {}
                for peer_name, body in outbox.values():
                    count, size = expected.get(peer_name, (0, 0))
                    expected[peer_name] = (count + 1, size + len(body))
                assert reopened.outbox == expected
            for peer_name in PEERS:
                rows = await store.pending(peer_name, 0, 1000)
                assert [(row.seq, row.body) for row in rows] == [
                    (seq, body) for seq, (owner, body) in sorted(outbox.items()) if owner == peer_name]
        await store.close()

    asyncio.run(run())


def test_many_concurrent_sends_share_few_commits(tmp_path: Path) -> None:
    async def run() -> tuple[int, int]:
        store = Store(tmp_path / "state.db", "full")
        await store.open()
        seqs = await asyncio.gather(*(store.add("beta", b"x" * 100, time.time(), None) for _ in range(2000)))
        assert sorted(seqs) == list(range(1, 2001))
        await store.close()
        return store.commits, store.writes

    commits, writes = asyncio.run(run())
    assert writes == 2000 and commits < 200  # group commit: one transaction per batch, not per send


def test_expired_and_purged_rows_leave_and_are_reported(tmp_path: Path) -> None:
    async def run() -> None:
        store = Store(tmp_path / "state.db")
        await store.open()
        now = time.time()
        await store.add("beta", b"old", now, now - 1)
        await store.add("beta", b"forever", now, None)
        await store.add("gamma", b"abc", now, now + 3600)
        assert [(row.peer, row.size) for row in await store.expire(now)] == [("beta", 3)]
        assert [(row.peer, row.size) for row in await store.purge("gamma")] == [("gamma", 3)]
        summary = await store.summary()
        assert set(summary) == {"beta"} and summary["beta"].messages == 1 and summary["beta"].bytes == 7
        await store.close()

    asyncio.run(run())


def test_acknowledged_rows_below_the_floor_are_pruned_and_still_recognised(tmp_path: Path) -> None:
    """floor_step=1: the floor is stored (and the inbox pruned) as soon as it moves."""
    async def run() -> None:
        store = Store(tmp_path / "state.db", floor_step=1)
        await store.open()
        ids = [await store.receive("beta", 5, seq, 1, b"m", time.time()) for seq in range(1, 11)]
        for inbox_id in ids[:8]:
            await store.ack(inbox_id)
        # The sender says everything below 9 is settled: rows 1..8 (acked) go, unacked 9 and 10 stay.
        assert await store.receive("beta", 5, 11, 9, b"m", time.time()) is not None
        await store.close()
        connection = sqlite3.connect(tmp_path / "state.db")
        left = [row[0] for row in connection.execute("SELECT seq FROM inbox ORDER BY seq")]
        connection.close()
        assert left == [9, 10, 11]
        store = Store(tmp_path / "state.db", floor_step=1)
        opened = await store.open()
        assert [row.id for row in opened.unacked] == [ids[8], ids[9], ids[9] + 1]
        for seq in (1, 5, 9, 11):  # resends of pruned and of kept rows alike are duplicates
            assert await store.receive("beta", 5, seq, 1, b"m", time.time()) is None
        assert await store.receive("gamma", 5, 1, 0, b"m", time.time()) is not None  # another peer's ids are its own
        await store.close()

    asyncio.run(run())


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_corrupt_database_is_refused_with_its_name(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    with pytest.raises(StorageError, match=str(path)):
        asyncio.run(Store(path).open())


def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE accounts (id INTEGER)")
    connection.commit()
    connection.close()
    with pytest.raises(StorageError, match="not a quicmesh durable-message database"):
        asyncio.run(Store(path).open())


def test_a_read_only_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def create() -> None:
        store = Store(path)
        await store.open()
        await store.close()

    asyncio.run(create())
    path.chmod(0o400)
    if os.geteuid() == 0:
        pytest.skip("as root, file modes do not stop writes (the full-disk test in tests/integration covers root)")
    with pytest.raises(StorageError, match=f"{path}.*readonly"):
        asyncio.run(Store(path).open())


def test_a_new_database_is_owner_only(tmp_path: Path) -> None:
    async def create() -> None:
        store = Store(tmp_path / "state.db")
        await store.open()
        await store.close()

    asyncio.run(create())
    assert (tmp_path / "state.db").stat().st_mode & 0o077 == 0


@given(origin=st.integers(0, 2**62 - 1), seq=st.integers(0, 2**62 - 1), body=st.binary(max_size=64), data=st.data())
def test_frame_round_trips(origin: int, seq: int, body: bytes, data: st.DataObject) -> None:
    floor = data.draw(st.integers(0, seq))
    assert decode_durable(encode_durable(origin, seq, floor, body)) == (origin, seq, floor, body)


@given(st.binary(max_size=40))
def test_frame_decoder_raises_only_protocol_error(data: bytes) -> None:
    try:
        frame = decode_durable(data)
    except ProtocolError:
        return
    assert frame.floor <= frame.seq


def test_duplicates_between_floor_steps_are_still_recognised(tmp_path: Path) -> None:
    """With the default step the floor is stored rarely; the UNIQUE key catches every repeat meanwhile."""
    async def run() -> None:
        store = Store(tmp_path / "state.db")
        await store.open()
        for seq in range(1, 301):
            assert await store.receive("beta", 5, seq, seq, b"m", time.time()) is not None
        for seq in (1, 100, 255, 256, 300):
            assert await store.receive("beta", 5, seq, 300, b"m", time.time()) is None
        await store.close()

    asyncio.run(run())
