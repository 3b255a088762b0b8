"""Operators' view of durable messages: `quicmesh outbox [--json]`, `quicmesh outbox purge PEER [--yes]`,
and the control ops behind them ("outbox", "outbox_purge"; docs/CONTROL.md).

Imported by the CLI (quicmesh.ops.control.FEATURE_MODULES), which registers the ops in the `quicmesh run` process
too. Light: argparse and the control client; the node's feature is looked up only inside the ops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from quicmesh.commands.common import EXIT_BAD_USAGE, EXIT_FAILED, EXIT_OK, error, node_socket
from quicmesh.errors import StorageError
from quicmesh.ops.control import BadRequestError, ControlClient, register_ops
from quicmesh.ops.status import format_bytes, format_duration

OUTBOX_EPILOG = """\
Lists, per peer, the durable messages waiting in this node's outbox: how many, their bytes, the oldest's
age, how many are on the wire now. `purge PEER` deletes that peer's (asks first; --yes for scripts); those
already on the wire may still arrive.
exit status: 0 success, 1 failure (unreachable node, no [storage]), 2 bad usage.
"""


def add_commands(command: Any, target: Any) -> None:
    outbox = command("outbox", "show (or purge) the durable messages waiting for each peer", _cmd_outbox,
                     OUTBOX_EPILOG)
    target(outbox)
    outbox.add_argument("action", nargs="?", choices=("purge",), help="purge: delete PEER's pending messages")
    outbox.add_argument("peer", nargs="?", help="the peer whose messages `purge` deletes")
    outbox.add_argument("--json", action="store_true", help="print the outbox document as JSON")
    outbox.add_argument("--yes", action="store_true", help="purge without asking")


def _cmd_outbox(args: argparse.Namespace) -> int:
    if args.action is None and args.peer is not None:
        args.parser.error(f"unexpected {args.peer!r}: did you mean `outbox purge {args.peer}`?")
    if args.action == "purge" and args.peer is None:
        args.parser.error("outbox purge needs the PEER whose messages to delete")
    path = node_socket(args)[0]

    async def call(op: str, **request: Any) -> dict[str, Any]:
        async with await ControlClient.connect(path) as client:
            return await client.call(op, **request)

    outbox = asyncio.run(call("outbox"))["outbox"]
    if args.action is None:
        print(json.dumps(outbox, indent=2) if args.json else render_outbox(outbox))
        return EXIT_OK
    pending = outbox["outbox"].get(args.peer, {"messages": 0, "bytes": 0})
    if not args.yes:
        if not sys.stdin.isatty():
            error("outbox purge asks for confirmation: give --yes when stdin is not a terminal")
            return EXIT_BAD_USAGE
        answer = input(f"delete {pending['messages']} durable messages ({format_bytes(pending['bytes'])}) waiting "
                       f"for {args.peer}? They will never be delivered. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            error("nothing purged")
            return EXIT_FAILED
    purged = asyncio.run(call("outbox_purge", peer=args.peer))
    result = {"peer": args.peer, "messages": purged["messages"], "bytes": purged["bytes"]}
    print(json.dumps(result) if args.json else
          f"purged {result['messages']} messages ({format_bytes(result['bytes'])}) waiting for {args.peer}")
    return EXIT_OK


def render_outbox(outbox: dict[str, Any]) -> str:
    """The outbox document as a table, then the totals and counters."""
    rows = [("PEER", "MESSAGES", "BYTES", "OLDEST", "ON WIRE", "PEER STATE")]
    for peer, entry in outbox["outbox"].items():
        state = "not configured" if not entry["configured"] else "connected" if entry["connected"] else "down"
        oldest = entry["oldest_age"]
        rows.append((peer, str(entry["messages"]), format_bytes(entry["bytes"]),
                     format_duration(oldest) if oldest is not None else "-", str(entry["in_flight"]), state))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if len(rows) == 1:
        lines = ["no durable messages waiting"]
    lines.append(f"total {outbox['outbox_messages']} messages ({format_bytes(outbox['outbox_bytes'])}) in "
                 f"{outbox['path']} (sync={outbox['sync']}); accepted {outbox['accepted']}, delivered "
                 f"{outbox['acknowledged']}, expired {outbox['expired']}, refused {outbox['refused']}, purged "
                 f"{outbox['purged']}; received {outbox['received']}, not yet acknowledged by the application "
                 f"{outbox['inbox_unacked']}")
    return "\n".join(lines)


# --- control ops (in the daemon) ------------------------------------------------------------------------
def _durable(client: Any) -> Any:
    from quicmesh.durable.feature import DurableMessages  # in the daemon only: a running node has it loaded

    node = client.server.node
    feature = node.features.find(DurableMessages)
    if feature is None:
        raise StorageError(f"node {node.name} has no [storage] path: durable messages are off")
    return feature


async def _op_outbox(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    return {"outbox": _durable(client).status()}


async def _op_outbox_purge(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    peer = request.get("peer")
    if not isinstance(peer, str) or not peer:
        raise BadRequestError("'peer' must be a non-empty string")
    messages, size = await _durable(client).purge(peer)
    return {"messages": messages, "bytes": size}


register_ops({"outbox": _op_outbox, "outbox_purge": _op_outbox_purge})
