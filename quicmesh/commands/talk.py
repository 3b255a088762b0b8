"""Talking to a running node through its control socket: send, request, listen, ping."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from quicmesh.commands.common import EXIT_FAILED, EXIT_OK, count, error, node_socket, seconds
from quicmesh.errors import PeerNotConnectedError, QuicmeshError, RequestTimeoutError
from quicmesh.ops.control import CLIENT_LINE_LIMIT, REPLY_TIMEOUT, ControlClient, NodeUnreachableError
from quicmesh.ops.status import format_rtt

SEND_WINDOW = 64        # `send --lines`: messages awaiting their acknowledgement at once
PING_TIMEOUT = 2.0      # seconds a ping waits for the peer's ACK before it counts as lost


def add_commands(command: Any, target: Any, epilog: str) -> None:
    """The client subcommands (the same ``command``/``target`` builders as features' commands get)."""
    send = command("send", "send a message (or a datagram) to a peer", _cmd_send)
    target(send)
    send.add_argument("peer")
    send.add_argument("data", metavar="DATA", help="the payload, or - to read standard input")
    send.add_argument("--datagram", action="store_true", help="unreliable datagram instead of a message")
    send.add_argument("--durable", action="store_true",
                      help="durable message: done once committed to the node's outbox ([storage], docs/DURABLE.md)")
    send.add_argument("--lines", action="store_true", help="send each line of DATA (or stdin) separately")
    send.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                      help="how long to wait for each acknowledgement (default 10)")

    request = command("request", "send a request to a peer and print its reply", _cmd_request)
    target(request)
    request.add_argument("peer", nargs="?", help="the peer to ask (or give --subject)")
    request.add_argument("data", metavar="DATA", help="the request body, or - to read standard input")
    request.add_argument("--subject", metavar="SUBJECT",
                         help="ask one subscriber of SUBJECT, wherever it is, instead of a peer (docs/PUBSUB.md)")
    request.add_argument("--timeout", type=seconds, default=5.0, metavar="SECONDS", help="default 5")

    listen = command("listen", "print the datagrams and messages a node receives", _cmd_listen,
                     epilog + "With --count, exit 1 if the timeout comes first.\n")
    target(listen)
    listen.add_argument("--json", action="store_true", help='JSON lines: {"peer", "kind", "data" (base64)}')
    listen.add_argument("--count", type=count, metavar="N", help="exit after N items")
    listen.add_argument("--timeout", type=seconds, metavar="SECONDS", help="exit after this long")
    listen.add_argument("--kind", choices=("datagram", "message"), help="only this kind")

    ping = command("ping", "measure the round trip to a peer through the mesh (a QUIC PING and its ACK)",
                   _cmd_ping, epilog + "Exit 1 when every ping was lost. -c is the count here, as in ping(8): "
                   "give the config as --config.\n")
    target(ping, short_config=False)
    ping.add_argument("peer")
    ping.add_argument("-c", "--count", type=count, default=4, metavar="N", help="how many pings (default 4)")
    ping.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS",
                      help="time between pings (default 1)")
    ping.add_argument("--timeout", type=seconds, default=PING_TIMEOUT, metavar="SECONDS",
                      help=f"wait this long for each answer (default {PING_TIMEOUT:g})")
    ping.add_argument("--json", action="store_true", help="print one JSON summary instead")


def _payload(data: str) -> bytes:
    return sys.stdin.buffer.read() if data == "-" else os.fsencode(data)


async def _stdin_lines() -> AsyncIterator[bytes]:
    """Lines of stdin as they come, so `tail -f log | quicmesh send --lines PEER -` streams; a pipe is read
    without blocking the event loop (and without a thread that could keep the process alive)."""
    if stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):  # a file never blocks
        for line in sys.stdin.buffer:
            yield line.removesuffix(b"\n").removesuffix(b"\r")
        return
    reader = asyncio.StreamReader(limit=CLIENT_LINE_LIMIT)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    try:
        while line := await reader.readline():
            yield line.removesuffix(b"\n").removesuffix(b"\r")
    finally:
        transport.close()


async def _given_lines(data: str) -> AsyncIterator[bytes]:
    for line in os.fsencode(data).splitlines():
        yield line


def _cmd_send(args: argparse.Namespace) -> int:
    path = node_socket(args)[0]
    if args.lines:
        return asyncio.run(_send_lines(path, args))
    data = _payload(args.data)

    async def send() -> None:
        async with await ControlClient.connect(path) as client:
            await _acked(client.send(args.peer, data, datagram=args.datagram, durable=args.durable), args)

    asyncio.run(send())
    return EXIT_OK


async def _acked(sending: Any, args: argparse.Namespace) -> None:
    try:
        await asyncio.wait_for(sending, args.timeout)
    except TimeoutError:
        raise QuicmeshError(f"{args.peer} did not acknowledge within {args.timeout:g}s (the node keeps "
                            "trying to deliver the message while it runs)") from None


async def _send_lines(path: Path, args: argparse.Namespace) -> int:
    """Each line is its own message; up to SEND_WINDOW await their acknowledgement at once."""
    kind = "datagram" if args.datagram else "message"
    window = asyncio.Semaphore(SEND_WINDOW)
    tasks: set[asyncio.Task[None]] = set()
    done = 0
    failure: str | None = None
    started = time.monotonic()

    number = 0

    async def send_one(client: ControlClient, line_number: int, line: bytes) -> None:
        nonlocal done, failure
        try:
            await _acked(client.send(args.peer, line, datagram=args.datagram, durable=args.durable), args)
            done += 1
        except QuicmeshError as exc:
            failure = failure or f"line {line_number}: {exc}"
            feeding.cancel()  # stop reading: stdin may stay open for a long time
        finally:
            window.release()

    async def feed(client: ControlClient) -> None:
        nonlocal number
        async for line in _stdin_lines() if args.data == "-" else _given_lines(args.data):
            await window.acquire()
            number += 1
            task = asyncio.create_task(send_one(client, number, line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async with await ControlClient.connect(path) as client:
        feeding = asyncio.create_task(feed(client))
        await asyncio.wait([feeding])  # ends when stdin does, or at the first failure
        await asyncio.gather(*tasks)
        if not feeding.cancelled() and feeding.exception() is not None:
            raise feeding.exception()
    if failure:
        error(f"{failure}; {done} of {number} {kind}s {'sent' if args.datagram else 'acknowledged'}")
        return EXIT_FAILED
    what = "all acknowledged" if not args.datagram else "datagrams are not acknowledged"
    print(f"quicmesh: sent {done} {kind}s to {args.peer} in {time.monotonic() - started:.2f}s ({what})",
          file=sys.stderr)
    return EXIT_OK


def _cmd_request(args: argparse.Namespace) -> int:
    if (args.peer is None) == (args.subject is None):
        args.parser.error("give either a PEER or --subject SUBJECT")
    path, data = node_socket(args)[0], _payload(args.data)

    async def request() -> bytes:
        async with await ControlClient.connect(path) as client:
            if args.subject is not None:
                from quicmesh.pubsub.cli import request_subject

                return await request_subject(client, args.subject, data, args.timeout)
            asking = client.request(args.peer, data, timeout=args.timeout)
            try:
                return await asyncio.wait_for(asking, args.timeout + REPLY_TIMEOUT)
            except TimeoutError:
                raise NodeUnreachableError(f"the node at {path} did not answer") from None

    reply = asyncio.run(request())
    if sys.stdout.isatty() and not reply.endswith(b"\n"):
        reply += b"\n"
    sys.stdout.buffer.write(reply)
    sys.stdout.flush()
    return EXIT_OK


def show_data(data: bytes) -> str:
    """Text if it is printable UTF-8, else ``hex:`` and the bytes in hex."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + data.hex()
    return text if text.isprintable() else "hex:" + data.hex()


def _cmd_listen(args: argparse.Namespace) -> int:
    return asyncio.run(_listen(node_socket(args)[0], args))


async def _listen(path: Path, args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else ["datagram", "message"]
    async with await ControlClient.connect(path) as client:
        node = await client.listen(kinds)
        print(f"quicmesh: listening on {node} for {' and '.join(k + 's' for k in kinds)} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

        def line(event: dict[str, Any]) -> str:
            if args.json:
                return json.dumps({k: event.get(k) for k in ("peer", "kind", "data")})
            return f"{event['peer']} {event['kind']} {show_data(base64.b64decode(event['data']))}"

        return await print_events(client, "received", line, args.count, args.timeout, what="items", who="listener")


async def print_events(client: ControlClient, kind: str, line: Callable[[dict[str, Any]], str], count: int | None,
                       timeout: float | None, *, what: str, who: str) -> int:
    """Print each ``kind`` event as ``line(event)`` until ``count`` of them or ``timeout``: the exit code
    (EXIT_FAILED when a count was asked for and the timeout came first); warns when events were dropped."""
    printed = 0
    try:
        async with asyncio.timeout(timeout):
            async for event in client.events():
                if event.get("event") == "dropped":
                    print(f"quicmesh: warning: {event.get('count')} {what} dropped: this {who} reads too slowly",
                          file=sys.stderr, flush=True)
                elif event.get("event") == kind:
                    print(line(event), flush=True)
                    printed += 1
                    if printed == count:
                        return EXIT_OK
    except TimeoutError:
        pass
    return EXIT_FAILED if count else EXIT_OK


def _cmd_ping(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 60:
        raise QuicmeshError(f"--timeout must be more than 0 and at most 60 seconds, got {args.timeout:g}")
    rtts, path = asyncio.run(_ping(node_socket(args)[0], args))
    got = [rtt for rtt in rtts if rtt is not None]
    summary: dict[str, Any] = {"peer": args.peer, "path": path, "sent": len(rtts), "received": len(got),
                               "loss": 1 - len(got) / len(rtts)}
    if got:
        summary.update(rtt_min=min(got), rtt_avg=sum(got) / len(got), rtt_max=max(got))
    if args.json:
        print(json.dumps({**summary, "rtts": rtts}, indent=2))
    else:
        print(f"--- {args.peer} ping: {len(rtts)} sent, {len(got)} received, {summary['loss']:.0%} loss"
              + (f", rtt min/avg/max {format_rtt(summary['rtt_min'])}/{format_rtt(summary['rtt_avg'])}/"
                 f"{format_rtt(summary['rtt_max'])}" if got else ""))
    return EXIT_OK if got else EXIT_FAILED


async def _ping(path: Path, args: argparse.Namespace) -> tuple[list[float | None], str]:
    """Ping ``args.count`` times; each answer (or its loss) is printed as it comes unless --json."""
    rtts: list[float | None] = []
    route = "direct"
    async with await ControlClient.connect(path) as client:
        for number in range(1, args.count + 1):
            started = time.monotonic()
            try:
                rtt, route = await asyncio.wait_for(client.ping(args.peer, timeout=args.timeout),
                                                    args.timeout + REPLY_TIMEOUT)
                line = f"{args.peer} ({route}): seq={number} time={format_rtt(rtt)}"
            except (RequestTimeoutError, PeerNotConnectedError) as exc:
                rtt, line = None, f"{args.peer}: seq={number} lost: {exc}"
            except TimeoutError:
                raise NodeUnreachableError(f"the node at {path} did not answer") from None
            rtts.append(rtt)
            if not args.json:
                print(line, flush=True)
            if number < args.count:
                await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    return rtts, route
