"""Durable messages end to end (docs/DURABLE.md): real node processes, real SQLite files, real kill -9.

The sender-crash and receiver-crash tests each move 10,000 durable messages between two processes and
SIGKILL one side at random moments (3 times), restarting it from the same database, then count: lost,
duplicated, redelivered after an acknowledgement. The driver is tests/durable_driver.py.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshkit import make_mesh
from quicmesh.config import StorageSection, load_config
from quicmesh.durable.feature import DurableMessages, DurableReceived
from quicmesh.errors import OutboxFullError, StorageError, UnknownPeerError
from quicmesh.runtime.node import Node

DRIVER = Path(__file__).parent.parent / "durable_driver.py"
COUNT = 10_000
KILLS = 3
PHASE_TIMEOUT = 90.0  # one whole run may take this long on a loaded 2-core machine


def _start(*args: object, preexec_fn=None) -> subprocess.Popen[bytes]:  # noqa: ANN001
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=preexec_fn)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(predicate, what: str, timeout: float = PHASE_TIMEOUT) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def _started_count(log: Path) -> int:
    return _lines(log).count("started")


def _numbers(lines: list[str], word: str) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith(word + " ")]


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    make_mesh(tmp_path, ["alpha", "beta"])
    return tmp_path


def _enable_storage(toml: Path) -> None:
    """``[storage] path = "state.db"`` in a node.toml (a rendered config already has a [storage] table)."""
    text = toml.read_text()
    if "\n[storage]\n" in text:
        toml.write_text(text.replace("\n[storage]\n", '\n[storage]\npath = "state.db"\n'))
    else:
        toml.write_text(text + '\n[storage]\npath = "state.db"\n')


def _stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill(process)


def test_sender_killed_three_times_loses_and_duplicates_nothing(mesh: Path) -> None:
    rng = random.Random()
    send_log, receive_log = mesh / "send.log", mesh / "receive.log"
    receiver = _start("receive", mesh / "beta" / "node.toml", mesh / "beta.db", receive_log)
    sender = None
    try:
        for kill in range(KILLS + 1):
            sender = _start("send", mesh / "alpha" / "node.toml", mesh / "alpha.db", "beta", COUNT, send_log)
            _wait_for(lambda: _started_count(send_log) > kill, "the sender to start", 30)
            if kill == KILLS:
                break
            # Kill it while it is pushing or delivering: somewhere in its first 0.1-1.5 s of work.
            time.sleep(rng.uniform(0.1, 1.5))
            _kill(sender)
        _wait_for(lambda: "drained" in _lines(send_log), "the last sender to drain its outbox")
        assert sender.wait(timeout=30) == 0, sender.stderr.read().decode() if sender.stderr else ""
        sent = _lines(send_log)
        ok, tried = set(_numbers(sent, "ok")), set(_numbers(sent, "try"))
        _wait_for(lambda: set(_numbers(_lines(receive_log), "got")) >= ok, "every accepted message to arrive", 30)
        time.sleep(0.5)  # anything duplicated would show up now
    finally:
        _stop(receiver, *(p for p in (sender,) if p is not None))
    got = collections.Counter(_numbers(_lines(receive_log), "got"))
    lost = ok - set(got)
    duplicated = {number: n for number, n in got.items() if n > 1}
    unknown = set(got) - tried
    print(f"sender crash: {_started_count(send_log)} sender runs, {len(ok)} accepted, {len(tried - ok)} "
          f"in progress at a kill, outbox at restarts {_numbers(sent, 'pending')}, {len(got)} received; "
          f"lost {len(lost)}, duplicated {len(duplicated)}")
    assert tried == set(range(COUNT))
    assert any(n > 0 for n in _numbers(sent, "pending")), "no kill hit the sender while its outbox held messages"
    assert not lost and not duplicated and not unknown
    assert len(ok) >= COUNT - KILLS * 64  # at most one window of sends was cut by each kill


def test_receiver_killed_three_times_redelivers_only_unacknowledged(mesh: Path) -> None:
    rng = random.Random()
    send_log, receive_log = mesh / "send.log", mesh / "receive.log"
    sender = _start("send", mesh / "alpha" / "node.toml", mesh / "alpha.db", "beta", COUNT, send_log)
    receiver = None
    try:
        for kill in range(KILLS + 1):
            receiver = _start("receive", mesh / "beta" / "node.toml", mesh / "beta.db", receive_log)
            _wait_for(lambda: _started_count(receive_log) > kill, "the receiver to start", 30)
            if kill == KILLS:
                break
            before = len(_numbers(_lines(receive_log), "got"))
            # Kill it while it receives and acknowledges: after it took some, at a random moment.
            _wait_for(lambda: len(_numbers(_lines(receive_log), "got")) > before + 50, "messages to arrive", 30)
            time.sleep(rng.uniform(0.0, 0.6))
            _kill(receiver)
        _wait_for(lambda: "drained" in _lines(send_log), "the sender to drain its outbox")
        _wait_for(lambda: set(_numbers(_lines(receive_log), "got")) >= set(range(COUNT)),
                  "the application to get everything", 30)
        time.sleep(0.5)  # its last acks commit; anything redelivered would show up now
    finally:
        _stop(sender, *(p for p in (receiver,) if p is not None))
    events = _lines(receive_log)
    got = collections.Counter(_numbers(events, "got"))
    acked: set[int] = set()
    redelivered_after_ack = []
    for line in events:
        word, _, number = line.partition(" ")
        if word == "ack":
            acked.add(int(number))
        elif word == "got" and int(number) in acked:
            redelivered_after_ack.append(int(number))
    redelivered = sum(n - 1 for n in got.values())
    lost = set(range(COUNT)) - set(got)
    print(f"receiver crash: {_started_count(receive_log)} receiver runs, {len(got)} received, lost {len(lost)}, "
          f"{redelivered} redelivered (unacknowledged at a kill), {len(redelivered_after_ack)} after their ack")
    assert _started_count(receive_log) == KILLS + 1
    assert not lost
    assert not redelivered_after_ack
    # Every acknowledgement is committed (a kill may land between the commit and its "ack" line).
    with sqlite3.connect(mesh / "beta.db") as database:
        assert database.execute("SELECT count(*) FROM inbox WHERE body IS NOT NULL").fetchone() == (0,)
    assert set(_numbers(_lines(send_log), "ok")) == set(range(COUNT))


def test_a_full_disk_is_a_clear_error_for_the_sender(mesh: Path) -> None:
    def small_files() -> None:  # what the node may write: 1 MiB per file, like a disk that is full
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    log = mesh / "fill.log"
    filler = _start("fill", mesh / "alpha" / "node.toml", mesh / "alpha.db", "beta", log, preexec_fn=small_files)
    assert filler.wait(timeout=60) == 0, filler.stderr.read().decode() if filler.stderr else ""
    errors = [line for line in _lines(log) if line.startswith("error ")]
    assert len(errors) == 1, _lines(log)[-5:]
    assert errors[0].startswith(f"error StorageError: {mesh / 'alpha.db'}: cannot write")
    assert 10 < len(_numbers(_lines(log), "ok")) < 110  # it took messages until the file could not grow


def test_a_corrupt_database_stops_the_daemon_with_its_name(mesh: Path, cli) -> None:  # noqa: ANN001
    database = mesh / "alpha" / "state.db"
    database.write_bytes(b"this is not SQLite" * 500)
    toml = mesh / "alpha" / "node.toml"
    _enable_storage(toml)
    result = cli("run", "-c", str(toml))
    assert result.returncode != 0
    assert str(database) in result.stderr and "Traceback" not in result.stderr
    assert database.read_bytes() == b"this is not SQLite" * 500  # never replaced by an empty database


# --- in one process: limits, expiry, removed peers ----------------------------------------------------
def _with_storage(mesh: Path, name: str, **storage: object) -> Node:
    config = load_config(mesh / name / "node.toml")
    listen = dataclasses.replace(config.node.listen, host="127.0.0.1")
    return Node(dataclasses.replace(config, node=dataclasses.replace(config.node, listen=listen),
                                    storage=StorageSection(path=mesh / f"{name}.db", **storage)))


def test_limits_ttl_and_acks_in_one_process(mesh: Path) -> None:
    async def run() -> None:
        alpha = _with_storage(mesh, "alpha", max_peer_messages=3, max_bytes=1000)
        await alpha.start()
        durable = alpha.features.find(DurableMessages)
        assert durable is not None
        # beta is not running: messages wait in the outbox
        for _ in range(3):
            await alpha.send("beta", b"x", durable=True)
        with pytest.raises(OutboxFullError, match="3 messages for beta"):
            await alpha.send("beta", b"x", durable=True)
        with pytest.raises(UnknownPeerError):
            await alpha.send("nobody", b"x", durable=True)
        await durable.purge("beta")
        with pytest.raises(OutboxFullError, match="1000 bytes in total"):
            await alpha.send("beta", bytes(1001), durable=True)
        await alpha.send("beta", b"soon gone", durable=True, ttl=0.2)
        await asyncio.sleep(1.5)  # one sweep
        status = durable.status()
        assert status["expired"] == 1 and status["outbox_messages"] == 0 and status["purged"] == 3
        await alpha.send("beta", b"kept", durable=True)
        assert durable.status()["outbox"]["beta"]["messages"] == 1
        await alpha.stop()

        beta = _with_storage(mesh, "beta")
        alpha = _with_storage(mesh, "alpha")
        handled: list[bytes] = []

        def handler(item) -> None:  # noqa: ANN001
            assert isinstance(item, DurableReceived)
            handled.append(item.data)

        beta.set_receive_handler(handler)  # returns without raising: acknowledged
        await beta.start()
        await alpha.start()
        async with asyncio.timeout(10):
            while not handled:
                await asyncio.sleep(0.02)
            while beta.features.find(DurableMessages).status()["inbox_unacked"]:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        assert handled == [b"kept"]
        await alpha.stop()
        await beta.stop()
        with pytest.raises(StorageError, match="no \\[storage\\] path"):
            await Node(load_config(mesh / "alpha" / "node.toml")).send(
                "beta", b"x", durable=True)

    asyncio.run(run())


# --- the daemon, the control socket and the CLI -----------------------------------------------------------
def test_cli_send_durable_outbox_and_purge(local_mesh, cli) -> None:  # noqa: ANN001
    from conftest import RunningMesh

    alpha = local_mesh[0]
    _enable_storage(alpha.config)
    mesh = RunningMesh(local_mesh)
    try:
        mesh.start("alpha")  # beta and gamma stay down: durable messages wait for them
        _wait_for(lambda: alpha.socket.exists(), "alpha's control socket", 15)
        socket = ["--socket", str(alpha.socket)]
        for text in ("one", "two"):
            result = cli("send", *socket, "--durable", "beta", text)
            assert result.returncode == 0, result.stderr
        assert cli("send", *socket, "--durable", "--lines", "gamma", "a\nb\nc").returncode == 0
        result = cli("outbox", *socket)
        assert result.returncode == 0, result.stderr
        rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:3]}
        assert rows["beta"][1] == "2" and rows["gamma"][1] == "3" and "down" in result.stdout
        document = json.loads(cli("outbox", *socket, "--json").stdout)
        assert document["outbox"]["beta"]["bytes"] == 6 and document["outbox_messages"] == 5
        assert mesh.status("alpha")["durable"]["outbox"]["gamma"]["messages"] == 3
        refused = cli("outbox", *socket, "purge", "gamma")  # stdin is not a terminal: no silent purge
        assert refused.returncode == 2 and "--yes" in refused.stderr
        purged = cli("outbox", *socket, "purge", "gamma", "--yes")
        assert purged.returncode == 0 and "purged 3 messages" in purged.stdout
        both = cli("send", *socket, "--durable", "--datagram", "beta", "x")
        assert both.returncode == 1 and "cannot be durable" in both.stderr
        mesh.start("beta")  # beta has no [storage]: it refuses, alpha keeps the messages and retries
        _wait_for(lambda: "not taken" in mesh.log("alpha"), "alpha to hear beta refuse", 20)
        assert json.loads(cli("outbox", *socket, "--json").stdout)["outbox"]["beta"]["messages"] == 2
    finally:
        mesh.stop(timeout=2.0)
