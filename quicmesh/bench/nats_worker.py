"""One NATS bench process: ``python -m quicmesh.bench.nats_worker '<job as JSON>'`` (nats-py client).

The NATS counterpart of a :mod:`.pubsub` worker, with the same lines on stdin/stdout and the same payloads
(sequence number and send time, then padding): it connects to the bench's nats-server over TLS with a client
certificate, says ``ready`` (a subscriber or responder once the server has its subscription), then

- ``pub``: publishes ``msgs`` messages after ``go`` with :mod:`.pubsub`'s own loop (yielding whenever the
  client holds :data:`~.worker.DATAGRAM_HIGH_WATER` messages unsent, the bound quicmesh's publisher keeps),
  and reports ``done``;
- ``sub``: counts what arrives (one-way latency from the payload) until ``stop``, then reports ``done``;
- ``request``: sends ``msgs`` sequential requests after ``go`` with :mod:`.pubsub`'s loop, reports ``done``;
- ``respond``: echoes every request until ``stop``.

Every wait has a deadline; the client never reconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
from typing import Any

from quicmesh.bench.common import HEADER, Samples, emit, now, percentiles, run_on
from quicmesh.bench.pubsub import REQUEST_SUBJECT, SUBJECT
from quicmesh.bench.pubsub import _publish as pubsub_publish
from quicmesh.bench.pubsub import _request as pubsub_request
from quicmesh.bench.worker import CONNECT_TIMEOUT, QUIET, QUIET_MAX, Commands

FLUSH_TIMEOUT = 5.0


def client_tls(job: dict[str, Any]) -> ssl.SSLContext:
    """Verify the server against the bench CA and present this client's certificate (the server requires one)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=job["ca"])
    context.load_cert_chain(job["cert"], job["key"])
    return context


async def connect(job: dict[str, Any], errors: list[str]) -> Any:
    """A nats-py client; asynchronous errors (e.g. a slow consumer) go to ``errors``, reported, not fatal."""
    import nats

    async def note_error(error: Exception) -> None:
        errors.append(type(error).__name__)

    return await nats.connect(job["url"], tls=client_tls(job), connect_timeout=CONNECT_TIMEOUT,
                              allow_reconnect=False, error_cb=note_error, name=f"quicmesh-bench-{job['name']}")


async def _worker(job: dict[str, Any]) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"bench {job['name']}: %(name)s: %(message)s")
    commands = Commands()
    errors: list[str] = []
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT + 5):
            client = await connect(job, errors)
    except (OSError, TimeoutError, ssl.SSLError) as error:
        emit("error", message=f"{job['name']}: no connection to nats-server: {error}")
        return 1
    try:
        role = job["role"]
        if role in ("sub", "respond"):
            return await _serve(client, job, commands, errors)
        emit("ready")
        if not await commands.wait("go", job["timeout"]):
            return 1
        result = await (_publish(client, job) if role == "pub" else _request(client, job))
        emit("done", errors=errors, **result)
        await commands.wait("stop", job["timeout"])
        return 0
    finally:
        await client.close()


async def _serve(client: Any, job: dict[str, Any], commands: Commands, errors: list[str]) -> int:
    """A subscriber (counts) or a responder (echoes), until ``stop``."""
    samples = Samples()
    tally = {"received": 0, "last": 0.0}
    unpack, clock = HEADER.unpack_from, now

    async def count(msg: Any) -> None:
        t = clock()
        samples.add(t - unpack(msg.data)[1])
        tally["received"] += 1
        tally["last"] = t

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    if job["role"] == "sub":
        await client.subscribe(SUBJECT, cb=count)
    else:
        await client.subscribe(REQUEST_SUBJECT, cb=echo)
    await client.flush(timeout=CONNECT_TIMEOUT)  # the server has the subscription once its PONG is back
    emit("ready")
    await commands.wait("stop", job["timeout"] + 30)
    quiet_until = now() + QUIET_MAX
    while now() < quiet_until and now() - (tally["last"] or 0.0) < QUIET:
        await asyncio.sleep(0.05)
    emit("done", received=tally["received"], last=tally["last"], latency=percentiles(samples.values),
         errors=errors)
    return 0


class _AsNode:
    """A nats-py client seen as the node :mod:`.pubsub`'s publish and request loops drive, so both sides of the
    comparison run the very same loops: its backlog is what the client holds unsent, in messages."""

    def __init__(self, client: Any, size: int) -> None:
        self.client = client
        self.size = size
        self.publish = client.publish

    def datagram_backlog(self, _server: str) -> int:
        return self.client.pending_data_size // self.size

    async def request_subject(self, subject: str, data: bytes, timeout: float) -> bytes:
        return (await self.client.request(subject, data, timeout=timeout)).data


async def _publish(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    result = await pubsub_publish(_AsNode(client, job["size"]), {**job, "subscribers": ["nats-server"]})
    await client.flush(timeout=FLUSH_TIMEOUT)
    return result


async def _request(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    return await pubsub_request(_AsNode(client, job["size"]), job)


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    sys.exit(run_on(job["loop"], lambda: _worker(job)))
