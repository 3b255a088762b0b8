"""A node process for the durable-message tests (tests/integration/test_durable.py): real process, real
SQLite file, killed with SIGKILL by the test. Every line it logs is written with os.write to an O_APPEND
file, so what it logged before a kill -9 is there afterwards.

    python tests/durable_driver.py send    NODE_TOML DB PEER COUNT LOG   # durable sends, then waits for the drain
    python tests/durable_driver.py receive NODE_TOML DB LOG              # recv(), log "got i"; 20 ms later ack, "ack i"
    python tests/durable_driver.py fill    NODE_TOML DB PEER LOG         # 10 KiB durable sends until one fails

The sender resumes after the highest ``try`` in its log: a send that was in progress at the kill may or
may not have been committed (never reported "ok"), and is not sent again, so it may arrive once or not at
all but never twice; every "ok" one must arrive exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path

from quicmesh.config import StorageSection, load_config
from quicmesh.durable.feature import DurableMessages, DurableReceived
from quicmesh.errors import QuicmeshError
from quicmesh.runtime.node import Node

IN_FLIGHT = 64
ACK_DELAY = 0.02  # seconds the receiving application takes before it acknowledges


def load(node_toml: str, db: str) -> Node:
    config = load_config(node_toml)
    listen = dataclasses.replace(config.node.listen, host="127.0.0.1")
    timers = dataclasses.replace(config.timers, keepalive=0.2, dead_after=1.0, backoff_min=0.05, backoff_max=0.3)
    return Node(dataclasses.replace(config, node=dataclasses.replace(config.node, listen=listen), timers=timers,
                                    storage=StorageSection(path=Path(db))))


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def __call__(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def resume_point(path: str) -> int:
    try:
        lines = Path(path).read_text().split("\n")
    except FileNotFoundError:
        return 0
    tried = [int(line.split()[1]) for line in lines if line.startswith("try ")]
    return max(tried) + 1 if tried else 0


async def send(node_toml: str, db: str, peer: str, count: int, log_path: str) -> None:
    start = resume_point(log_path)
    log = Log(log_path)
    node = load(node_toml, db)
    await node.start()
    log("started")
    durable = node.features.find(DurableMessages)
    assert durable is not None
    log(f"pending {durable.status()['outbox_messages']}")  # what an earlier run left in the outbox
    slots = asyncio.Semaphore(IN_FLIGHT)
    tasks = set()

    async def one(number: int) -> None:
        try:
            await node.send(peer, b"%d" % number, durable=True)
            log(f"ok {number}")
        finally:
            slots.release()

    for number in range(start, count):
        await slots.acquire()
        log(f"try {number}")
        task = asyncio.create_task(one(number))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    log("done")
    async with asyncio.timeout(120):
        while durable.status()["outbox_messages"]:
            await asyncio.sleep(0.05)
    log("drained")
    await node.stop()


async def receive(node_toml: str, db: str, log_path: str) -> None:
    log = Log(log_path)
    node = load(node_toml, db)
    await node.start()
    log("started")
    tasks = set()

    async def handle(item: DurableReceived) -> None:
        await asyncio.sleep(ACK_DELAY)  # an application that takes a moment: some are always unacknowledged
        await item.ack()
        log(f"ack {item.data.decode()}")

    async for item in node.received():
        assert isinstance(item, DurableReceived)
        log(f"got {item.data.decode()}")
        task = asyncio.create_task(handle(item))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def fill(node_toml: str, db: str, peer: str, log_path: str) -> None:
    log = Log(log_path)
    node = load(node_toml, db)
    await node.start()
    log("started")
    try:
        for number in range(100_000):
            await node.send(peer, bytes(10_240), durable=True)
            log(f"ok {number}")
    except QuicmeshError as error:
        log(f"error {type(error).__name__}: {error}")
    await node.stop()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "send":
        asyncio.run(send(args[0], args[1], args[2], int(args[3]), args[4]))
    elif role == "receive":
        asyncio.run(receive(*args))
    else:
        asyncio.run(fill(*args))
