"""One bench process: ``python -m quicmesh.bench.worker '<job as JSON>'``.

It starts a quicmesh node or a bare-aioquic endpoint (``job["impl"]``), says ``ready`` on stdout once
connected to its peers, then, as a sender, waits for ``go`` on stdin, sends and reports ``done``; as a
receiver, counts what arrives until ``stop`` on stdin and reports ``done``. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from quicmesh.bench.common import HEADER, Samples, emit, now, percentiles, run_on

#: Datagrams a sender lets wait in the local queues (quicmesh's, or aioquic's) before it yields.
DATAGRAM_HIGH_WATER = 256
DATAGRAM_BURST = 64
#: Reliable messages in flight per sender (quicmesh's default message_window), and bulk chunks.
MESSAGE_WINDOW = 64
BULK_WINDOW = 8
#: bare aioquic queues every chunk on one stream, whose send buffer slows down past ~2 MiB: 2 is its best
BARE_BULK_WINDOW = 2
#: After ``stop``, a datagram receiver waits for stragglers until this quiet, at most QUIET_MAX.
QUIET = 0.3
QUIET_MAX = 3.0
CONNECT_TIMEOUT = 30.0
#: Where a relayed bench's sender and receiver believe each other to be: the discard port, where nothing
#: listens on loopback, so each reaches the other only through the relay.
UNREACHABLE_PORT = 9
PING_COUNT = 21
SETTLE = 0.5
PROGRESS_EVERY = 1.0
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from


class Commands:
    """Lines from the runner on stdin (``go``, ``stop``); EOF counts as ``stop``."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._buffer = b""
        os.set_blocking(sys.stdin.fileno(), False)
        self._loop.add_reader(sys.stdin.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(sys.stdin.fileno(), 4096)
        except BlockingIOError:
            return
        if not chunk:
            self._loop.remove_reader(sys.stdin.fileno())
            self._queue.put_nowait("stop")
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._queue.put_nowait(line.decode().strip())

    async def wait(self, word: str, timeout: float) -> bool:
        """Wait for ``word`` (or ``stop``); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self._queue.get()
                    if line in (word, "stop"):
                        return line == word
        except TimeoutError:
            return False


class PeerTally:
    """What a receiver counted from one sending peer (slots: this runs once per datagram)."""

    __slots__ = ("received", "bytes", "first", "last")

    def __init__(self, t: float) -> None:
        self.received = 0
        self.bytes = 0
        self.first = t
        self.last = t


class Receiver:
    """What a receiving process counts, per sending peer."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.per_peer: dict[str, PeerTally] = {}
        self.samples = Samples()
        self.count = 0
        self.last = 0.0

    def datagram(self, peer: str, payload: bytes) -> None:
        t = self.counted(peer, len(payload))
        if len(payload) >= _HEADER_SIZE:
            self.samples.add(t - _unpack_header(payload)[1])

    def message(self, peer: str, payload: bytes) -> None:
        self.counted(peer, len(payload))

    def counted(self, peer: str, nbytes: int) -> float:
        """Count one item; returns the time it was counted at."""
        t = now()
        stats = self.per_peer.get(peer) or self.per_peer.setdefault(peer, PeerTally(t))
        stats.received += 1
        stats.bytes += nbytes
        stats.last = self.last = t
        self.count += 1
        return t

    def report(self) -> dict[str, Any]:
        peers = {name: {slot: getattr(tally, slot) for slot in PeerTally.__slots__} for name, tally in self.per_peer.items()}
        return {"peers": peers, "latency": percentiles(self.samples.values) if self.mode == "datagram" else None}


# --- implementations ----------------------------------------------------------------------------------
class QuicmeshImpl:
    """A real quicmesh Node."""

    def __init__(self, job: dict[str, Any], receiver: Receiver | None) -> None:
        self.job = job
        self.receiver = receiver
        self.node: Any = None
        self.reader: asyncio.Future[None] | None = None  # the public-API receiver's received() loop

    async def start(self) -> None:
        from quicmesh.config import Address, load_config
        from quicmesh.runtime.node import Node

        config = load_config(self.job["config"])
        wanted, unreachable = set(self.job["peers"]), set(self.job.get("unreachable", ()))
        peers = tuple(dataclasses.replace(p, address=Address(p.address.host, UNREACHABLE_PORT))
                      if p.name in unreachable else p for p in config.peers if p.name in wanted)
        config = dataclasses.replace(config, peers=peers)
        if self.job.get("max_datagram_size"):
            limits = dataclasses.replace(config.limits, max_datagram_size=self.job["max_datagram_size"])
            config = dataclasses.replace(config, limits=limits)
        if self.job.get("durable"):  # durable messages: each node its own database in the bench's folder
            from quicmesh.config import StorageSection

            storage = StorageSection(path=Path(self.job["tmp"]) / f"{self.job['name']}.db", sync=self.job["durable"])
            config = dataclasses.replace(config, storage=storage)
        self.node = Node(config)
        await self.node.start()
        if self.receiver is not None and self.job.get("api") == "public":
            self._serve_public_api(self.receiver)
        elif self.receiver is not None:
            receiver = self.receiver

            def echo(peer: str, data: bytes) -> bytes:  # a plain handler: answered without a task
                receiver.message(peer, data)
                return data

            self.node.set_request_handler(echo)

            def deliver(item: Any) -> None:  # the receive handler: no task switch per item (docs/API.md)
                if item.kind == "datagram":
                    receiver.datagram(item.peer, item.data)
                else:
                    receiver.message(item.peer, item.data)

            self.node.set_receive_handler(deliver)
        await self.node.wait_connected(timeout=CONNECT_TIMEOUT)
        # Both ends dial: let the mesh settle which duplicate connection it keeps before traffic starts.
        await asyncio.sleep(SETTLE)
        await self.node.wait_connected(timeout=CONNECT_TIMEOUT)

    def _serve_public_api(self, receiver: Receiver) -> None:
        """Receive as an application usually does: ``async for`` over ``received()``, an async handler."""

        async def echo(peer: str, data: bytes) -> bytes:
            receiver.message(peer, data)
            return data

        self.node.set_request_handler(echo)

        async def read_all() -> None:
            async for item in self.node.received():
                if item.kind == "datagram":
                    receiver.datagram(item.peer, item.data)
                else:
                    receiver.message(item.peer, item.data)

        self.reader = asyncio.ensure_future(read_all())

    def send_datagram(self, peer: str, payload: bytes) -> None:
        self.node.send_datagram(peer, payload)

    def datagram_backlog(self, peer: str) -> int:
        return self.node.datagram_backlog(peer)

    def datagrams_dropped(self, peer: str) -> int:
        for status in self.node.peers():
            if status.name == peer:
                return status.counters["datagrams_dropped"]
        return 0

    async def send_message(self, peer: str, payload: bytes) -> None:
        await self.node.send(peer, payload, durable=bool(self.job.get("durable")))

    async def drain(self) -> None:
        """Durable messages: wait until the outbox is empty (every one committed by the receiving node)."""
        from quicmesh.durable.feature import DurableMessages

        durable = self.node.features.find(DurableMessages)
        while durable.status()["outbox_messages"]:
            await asyncio.sleep(0.005)

    async def request(self, peer: str, payload: bytes) -> bytes:
        return await self.node.request(peer, payload, timeout=10.0)

    def paths(self) -> dict[str, str | None]:
        return {status.name: status.path for status in self.node.peers()}

    async def rtts(self) -> dict[str, float]:
        """Each peer's round-trip time (seconds, median of PING_COUNT QUIC PINGs) before traffic starts: a
        relayed peer's spans both hops; the relay's is one hop's (the relayed bench's latency target)."""
        medians = {}
        for name in self.job["peers"]:
            samples = []
            for _ in range(PING_COUNT):  # timed here: Node.ping's own figure has the loop clock's granularity
                started = now()
                await self.node.ping(name)
                samples.append(now() - started)
            medians[name] = sorted(samples)[len(samples) // 2]
        return medians

    def relay_status(self) -> dict[str, Any]:
        from quicmesh.relay.feature import RelayFeature

        status = self.node.features.find(RelayFeature).status()
        return {"circuits_open": status["circuits_open"], **status["counters"]}

    async def close(self) -> None:
        await self.node.stop()
        if self.reader is not None:
            await self.reader  # received() ends once the node stopped


def make_impl(job: dict[str, Any], receiver: Receiver | None) -> Any:
    if job["impl"] == "bare":
        from quicmesh.bench.bare import BareImpl

        return BareImpl(job, receiver)
    return QuicmeshImpl(job, receiver)


# --- the sender's loops ------------------------------------------------------------------------------
class Progress:
    def __init__(self) -> None:
        self.count = 0
        self._handle = asyncio.get_running_loop().call_later(PROGRESS_EVERY, self._tick)

    def _tick(self) -> None:
        emit("progress", count=self.count)
        self._handle = asyncio.get_running_loop().call_later(PROGRESS_EVERY, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()


async def run_sender(impl: Any, job: dict[str, Any]) -> dict[str, Any]:
    mode, peer, size = job["mode"], job["target"], job["size"]
    total = job["msgs"] or 2**62
    deadline = now() + (job["duration"] or job["timeout"])
    rate = job["rate"] or 0.0
    pad = b"\0" * (size - HEADER.size)
    samples = Samples()
    progress = Progress()
    started = now()
    sent = 0
    timed_out = False

    def paced(done: int) -> float:
        """Seconds to wait before message number ``done`` may go (0 when it may go now)."""
        if not rate:
            return 0.0
        return started + done / rate - now()

    try:
        if mode == "datagram":
            send, backlog = impl.send_datagram, impl.datagram_backlog
            pack = HEADER.pack
            clock = now
            sleep = asyncio.sleep
            while sent < total:
                t = clock()
                if t >= deadline:
                    timed_out = not job["duration"]
                    break
                if rate:
                    due = min(int((t - started) * rate) + 1 - sent, total - sent, DATAGRAM_BURST)
                    if due <= 0:
                        await sleep(min(0.001, max(0.0, paced(sent))))
                        continue
                else:
                    if backlog(peer) >= DATAGRAM_HIGH_WATER:
                        await sleep(0)
                        continue
                    due = min(DATAGRAM_BURST, total - sent)
                for _ in range(due):
                    send(peer, pack(sent, clock()) + pad)
                    sent += 1
                progress.count = sent
                await sleep(0)
        elif mode in ("message", "bulk"):
            window = MESSAGE_WINDOW if mode == "message" else int(os.environ.get(
                "QUICMESH_BENCH_BULK_WINDOW", BARE_BULK_WINDOW if job["impl"] == "bare" else BULK_WINDOW))
            next_seq = 0

            async def worker() -> None:
                nonlocal next_seq, sent, timed_out
                while next_seq < total:
                    if now() >= deadline:
                        timed_out = not job["duration"]
                        return
                    wait = paced(next_seq)
                    seq = next_seq
                    next_seq += 1
                    if wait > 0:
                        await asyncio.sleep(wait)
                    t = now()
                    await impl.send_message(peer, HEADER.pack(seq, t) + pad)
                    samples.add(now() - t)
                    sent += 1
                    progress.count = sent

            await asyncio.gather(*(worker() for _ in range(window)))
            if job.get("durable"):
                await impl.drain()
        elif mode == "request":
            while sent < total:
                t = now()
                if t >= deadline:
                    timed_out = not job["duration"]
                    break
                wait = paced(sent)
                if wait > 0:
                    await asyncio.sleep(wait)
                    t = now()
                reply = await impl.request(peer, HEADER.pack(sent, t) + pad)
                samples.add(now() - t)
                if len(reply) != size:
                    raise RuntimeError(f"request reply of {len(reply)} bytes, expected {size}")
                sent += 1
                progress.count = sent
        else:
            raise ValueError(f"unknown mode {mode!r}")
        ended = now()
        dropped = impl.datagrams_dropped(peer) if mode == "datagram" else 0
    finally:
        progress.cancel()
    return {
        "sent": sent,
        "dropped_at_sender": dropped,
        "bytes": sent * size,
        "start": started,
        "end": ended,
        "timed_out": timed_out,
        "latency": None if mode == "datagram" else percentiles(samples.values),
    }


async def main(job: dict[str, Any]) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"bench {job['name']}: %(name)s: %(message)s")
    receiver = Receiver(job["mode"]) if job["role"] == "recv" else None
    commands = Commands()
    impl = make_impl(job, receiver)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT + 5):
            await impl.start()
    except TimeoutError:
        emit("error", message=f"{job['name']}: not connected within {CONNECT_TIMEOUT:g}s")
        return 1
    emit("ready", loop=type(asyncio.get_running_loop()).__module__, pid=os.getpid(), paths=impl.paths(),
         rtt=await impl.rtts() if job.get("ping") else {})
    limit = job["timeout"]
    try:
        if job["role"] == "relay":  # forwards the others' packets until told to stop
            await commands.wait("stop", limit)
            emit("done", relay=impl.relay_status())
        elif receiver is None:
            if not await commands.wait("go", limit):
                emit("error", message=f"{job['name']}: no go")
                return 1
            cpu0 = _cpu()
            result = await run_sender(impl, job)
            emit("done", cpu=_cpu() - cpu0, **result)
            await commands.wait("stop", limit)
        else:
            progress_task = asyncio.ensure_future(_receiver_progress(receiver))
            cpu0 = _cpu()
            await commands.wait("stop", limit)
            quiet_until = now() + QUIET_MAX
            while now() < quiet_until and now() - (receiver.last or 0.0) < QUIET:
                await asyncio.sleep(0.05)
            progress_task.cancel()
            emit("done", cpu=_cpu() - cpu0, **receiver.report())
    finally:
        try:
            async with asyncio.timeout(5):
                await impl.close()
        except TimeoutError:
            pass
    return 0


def _cpu() -> float:
    """CPU seconds (user + system) this process used so far."""
    times = os.times()
    return times.user + times.system


async def _receiver_progress(receiver: Receiver) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        emit("progress", count=receiver.count)


def entry() -> int:
    job = json.loads(sys.argv[1])
    profile_dir = os.environ.get("QUICMESH_BENCH_PROFILE")  # a folder: write a cProfile dump per process
    try:
        if profile_dir:
            import cProfile

            profiler = cProfile.Profile()
            try:
                return profiler.runcall(run_on, job["loop"], lambda: main(job))
            finally:
                profiler.dump_stats(os.path.join(profile_dir, f"{job['impl']}-{job['mode']}-{job['name']}.prof"))
        return run_on(job["loop"], lambda: main(job))
    except Exception as error:  # noqa: BLE001 - reported to the runner, which shows it
        emit("error", message=f"{job['name']}: {type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    sys.exit(entry())
