"""A queue-group member in its own process, for tests/integration/test_pubsub.py to kill with SIGKILL:

    python tests/pubsub_member.py NODE_TOML SUBJECT QUEUE LOG

It subscribes, writes ``ready`` to its log once every peer knows (its RESETs are out), then one line per
message it receives (the payload), each with os.write to an O_APPEND file: what it logged before a kill
is there afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys

from quicmesh.config import load_config
from quicmesh.runtime.node import Node


async def main(node_toml: str, subject: str, queue: str, log_path: str) -> None:
    config = load_config(node_toml)
    listen = dataclasses.replace(config.node.listen, host="127.0.0.1")
    timers = dataclasses.replace(config.timers, keepalive=0.2, dead_after=1.0, backoff_min=0.05, backoff_max=0.3)
    node = Node(dataclasses.replace(config, node=dataclasses.replace(config.node, listen=listen), timers=timers))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    async with node:
        subscription = node.subscribe(subject, queue=queue)
        await node.wait_connected(timeout=20)
        await asyncio.sleep(0.3)
        os.write(log, b"ready\n")
        async for msg in subscription:
            os.write(log, msg.data + b"\n")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
