"""Subjects from the command line: `quicmesh pub SUBJECT DATA|-`, `quicmesh sub SUBJECT [--queue Q] [--json]`,
and `quicmesh request --subject` (in commands/talk.py, through :func:`request_subject`); the control ops
behind them ("publish", "subscribe", "request_subject"; docs/CONTROL.md).

Imported by the CLI (quicmesh.ops.control.FEATURE_MODULES), which registers the ops in the `quicmesh run` process
too. Light: argparse and the control client; the node's feature is looked up only inside the ops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from typing import Any

from quicmesh.commands.common import EXIT_OK, count, node_socket, seconds
from quicmesh.ops.control import (REPLY_TIMEOUT, BadRequestError, ControlClient, NodeUnreachableError, _data,
                                  _text, b64encode, encode, register_ops)

SUB_EPILOG = """\
Prints each message published on SUBJECT anywhere in the mesh (wildcards: * one token, > the rest), one line
each: "SUBJECT PEER DATA" (DATA as text, or hex: when it is not printable), or JSON lines with --json.
With --queue, this subscriber is one member of queue group Q: each message goes to one member only.
exit status: 0 success (with --count: N messages came), 1 failure or timeout first, 2 bad usage.
"""


def add_commands(command: Any, target: Any) -> None:
    pub = command("pub", "publish a message on a subject to its subscribers across the mesh", _cmd_pub)
    target(pub)
    pub.add_argument("subject", metavar="SUBJECT", help="e.g. orders.eu.created (no wildcards)")
    pub.add_argument("data", metavar="DATA", help="the payload, or - to read standard input")
    pub.add_argument("--reliable", action="store_true",
                     help="as reliable messages: wait until every subscribing node accepted it")

    sub = command("sub", "print the messages published on a subject pattern", _cmd_sub, SUB_EPILOG)
    target(sub)
    sub.add_argument("subject", metavar="SUBJECT", help="a subject pattern, e.g. orders.*.created or metrics.>")
    sub.add_argument("--queue", metavar="Q", help="join queue group Q (each message to one member)")
    sub.add_argument("--json", action="store_true", help='JSON lines: {"subject", "peer", "data" (base64)}')
    sub.add_argument("--count", type=count, metavar="N", help="exit after N messages")
    sub.add_argument("--timeout", type=seconds, metavar="SECONDS", help="exit after this long")


def _payload(data: str) -> bytes:
    from quicmesh.commands.talk import _payload as read  # one rule for DATA|- in every command

    return read(data)


def _cmd_pub(args: argparse.Namespace) -> int:
    path, data = node_socket(args)[0], _payload(args.data)

    async def publish() -> int:
        async with await ControlClient.connect(path) as client:
            reply = await client.call("publish", subject=args.subject, data=b64encode(data), reliable=args.reliable)
            return int(reply["nodes"])

    nodes = asyncio.run(publish())
    print(f"quicmesh: published on {args.subject} to {nodes} node{'s' if nodes != 1 else ''}"
          + (" (all accepted)" if args.reliable else ""), file=sys.stderr)
    return EXIT_OK


def _cmd_sub(args: argparse.Namespace) -> int:
    from quicmesh.commands.talk import print_events, show_data

    path = node_socket(args)[0]

    def line(event: dict[str, Any]) -> str:
        if args.json:
            return json.dumps({k: event.get(k) for k in ("subject", "peer", "data")})
        return f"{event['subject']} {event['peer']} {show_data(base64.b64decode(event['data']))}"

    async def subscribe() -> int:
        async with await ControlClient.connect(path) as client:
            node = (await client.call("subscribe", subject=args.subject, queue=args.queue))["node"]
            group = f" in queue group {args.queue}" if args.queue else ""
            print(f"quicmesh: subscribed to {args.subject}{group} on {node} (Ctrl-C to stop)", file=sys.stderr,
                  flush=True)
            return await print_events(client, "published", line, args.count, args.timeout, what="messages",
                                      who="subscriber")

    return asyncio.run(subscribe())


async def request_subject(client: ControlClient, subject: str, data: bytes, timeout: float) -> bytes:
    """`quicmesh request --subject`: one subscriber's reply, through the node at ``client``."""
    asking = client.call("request_subject", subject=subject, data=b64encode(data), timeout=timeout)
    try:
        reply = await asyncio.wait_for(asking, timeout + REPLY_TIMEOUT)
    except TimeoutError:
        raise NodeUnreachableError(f"the node at {client.path} did not answer") from None
    return base64.b64decode(reply["data"])


# --- control ops (in the daemon) ----------------------------------------------------------------------
def _feature(client: Any) -> Any:
    from quicmesh.pubsub.feature import PubSub  # the daemon has it loaded; clients never get here

    return client.server.node.features.find(PubSub)


_closers: set[asyncio.Future[None]] = set()  # one per `subscribe` connection: closes its subscription


async def _op_publish(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    reliable = request.get("reliable", False)
    if not isinstance(reliable, bool):
        raise BadRequestError("'reliable' must be true or false")
    return {"nodes": await _feature(client).publish(_text(request, "subject"), _data(request), reliable=reliable)}


async def _op_subscribe(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Events ``{"event": "published", "subject", "peer", "data"}`` on this connection until it closes."""
    queue = request.get("queue")
    if queue is not None and not isinstance(queue, str):
        raise BadRequestError("'queue' must be a string")

    def forward(msg: Any) -> None:
        client.offer(encode({"event": "published", "subject": msg.subject, "peer": msg.peer,
                             "data": b64encode(msg.data)}))

    subscription = _feature(client).subscribe(_text(request, "subject"), queue=queue, handler=forward)
    client._subscribe(frozenset())  # starts the event pump; no node events, only ours
    closing = asyncio.ensure_future(client.writer.wait_closed())
    _closers.add(closing)
    closing.add_done_callback(lambda done: (_closers.discard(done), subscription.close()))
    return {"node": client.server.node.name}


async def _op_request_subject(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    timeout = request.get("timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise BadRequestError("'timeout' must be a number of seconds in (0, 3600]")
    reply = await _feature(client).request(_text(request, "subject"), _data(request), timeout)
    return {"data": b64encode(reply)}


register_ops({"publish": _op_publish, "subscribe": _op_subscribe, "request_subject": _op_request_subject})
