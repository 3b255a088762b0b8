"""Operators' view of membership: `quicmesh members [--json]`, `quicmesh crl push FILE`, and the control ops
behind them ("members", "membership.crl"; docs/CONTROL.md).

Imported by the CLI (quicmesh.ops.control.FEATURE_MODULES), which registers the ops in the `quicmesh run` process
too. Light: argparse and the control client (a CRL file is split into DER blobs here without cryptography; the
node verifies it); the node's feature is looked up only inside the ops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import re
import time
from pathlib import Path
from typing import Any

from quicmesh.commands.common import EXIT_FAILED, EXIT_OK, error, node_socket
from quicmesh.membership.messages import MAX_CRL_SIZE  # pure: no cryptography
from quicmesh.ops.control import (
    REPLY_TIMEOUT,
    BadRequestError,
    ControlClient,
    NodeUnreachableError,
    _text,
    b64encode,
    register_ops,
)
from quicmesh.ops.status import format_duration

MEMBERS_EPILOG = """\
Lists the members this node knows (docs/MEMBERSHIP.md): name, the addresses it announced, the version of
its newest announcement, the peer it came from (source), when it was last heard from, whether this node is
connected to it, and its state (alive, or gone and why: left, silent for Ns, revoked).
exit status: 0 success, 1 the node is unreachable, 2 bad usage.
"""

CRL_EPILOG = """\
`crl push FILE` hands a CRL (PEM or DER, as `quicmesh-pki revoke` writes it) to the node, which verifies it
against the mesh CA, applies it if its CRL number is higher than the one it has, and passes it on to every
member: one push evicts a revoked node from the whole mesh. A PEM file with several CRLs pushes each.
exit status: 0 the node applied every CRL; 1 failure: an unreadable file, no CRL in it, or the node did not
apply one (not newer than the CRL it holds, not signed by a CA of the mesh; the reason is printed); 2 bad usage.
"""


def add_commands(command: Any, target: Any) -> None:
    members = command("members", "list the mesh's members as this node knows them", _cmd_members, MEMBERS_EPILOG)
    target(members)
    members.add_argument("--json", action="store_true", help="print the membership document as JSON")

    crl = command("crl", "push a CRL to a node, which spreads it to the mesh", _cmd_crl, CRL_EPILOG)
    target(crl)
    crl.add_argument("action", choices=("push",), help="push: send FILE's CRL to the node")
    crl.add_argument("file", metavar="FILE", type=Path, help="a CRL, PEM or DER (e.g. ca/crl.pem)")
    crl.add_argument("--json", action="store_true", help="print the node's answer for each CRL as JSON lines")


async def _call(path: Path, op: str, **request: Any) -> dict[str, Any]:
    """One control call; a daemon that does not answer within REPLY_TIMEOUT is unreachable, as for status."""
    async def ask() -> dict[str, Any]:
        async with await ControlClient.connect(path) as client:
            return await client.call(op, **request)

    try:
        return await asyncio.wait_for(ask(), REPLY_TIMEOUT)
    except TimeoutError:
        raise NodeUnreachableError(f"the node at {path} did not answer within {REPLY_TIMEOUT:.0f}s") from None


def _cmd_members(args: argparse.Namespace) -> int:
    document = asyncio.run(_call(node_socket(args)[0], "members"))["members"]
    print(json.dumps(document, indent=2) if args.json else render_members(document))
    return EXIT_OK


MEMBER_COLUMNS = ["NAME", "ADDRESSES", "VERSION", "SOURCE", "LAST-HEARD", "CONNECTED", "STATE"]


def render_members(document: dict[str, Any], now: float | None = None) -> str:
    """The membership document as a header line and one aligned line per member, alive ones first."""
    now = time.time() if now is None else now
    members = sorted(document.get("members") or (), key=lambda m: (m.get("state") != "alive", str(m.get("name"))))
    alive = sum(1 for member in members if member.get("state") == "alive")
    crl = document.get("crl_number")
    seeds = document.get("seeds") or ()
    admits = "any-certified" if document.get("open") else "configured"
    lines = [f"node {document.get('node', '?')}  members {admits}  mode {document.get('mode', '?')}  "
             f"{alive} alive, {len(members) - alive} gone  crl {'-' if crl is None else crl}  "
             f"seeds {', '.join(map(str, seeds)) or '-'}"]
    rows = [MEMBER_COLUMNS] + [_member_row(member, now) for member in members]
    widths = [max(len(row[i]) for row in rows) for i in range(len(MEMBER_COLUMNS) - 1)]
    lines += ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]
    if not members:
        lines[-1] = "no members known"
    counters = document.get("counters") or {}
    if counters:
        lines.append("counters: " + ", ".join(f"{name} {value}" for name, value in counters.items()))
    return "\n".join(lines)


def _member_row(member: dict[str, Any], now: float) -> list[str]:
    heard = member.get("last_heard")
    state = str(member.get("state", "?"))
    if state == "gone" and member.get("gone_reason"):
        state += f" ({member['gone_reason']})"
    return [
        str(member.get("name", "?")),
        ",".join(map(str, member.get("addresses") or ())) or "-",
        str(member.get("version", "-")),
        str(member.get("source") or "-"),
        f"{format_duration(max(0.0, now - heard))} ago" if heard else "-",
        "yes" if member.get("connected") else "no",
        state,
    ]


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----(.*?)-----END X509 CRL-----", re.DOTALL)
_PEM_ANY = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def read_crls(path: Path) -> list[bytes]:
    """The DER CRLs in ``path`` (PEM, one or more; or one DER); ValueError with a one-line reason otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" in data:
        blobs = []
        for body in _PEM_CRL.findall(data):
            try:
                blobs.append(base64.b64decode(b"".join(body.split()), validate=True))
            except binascii.Error:
                raise ValueError(f"{path}: a PEM CRL block is not valid base64") from None
        if not blobs:
            found = sorted({kind.decode() for kind in _PEM_ANY.findall(data)})
            raise ValueError(f"{path} holds no X509 CRL (found {', '.join(found)})")
    else:
        blobs = [data]
    for der in blobs:
        if not der or der[0] != 0x30:
            raise ValueError(f"{path} is not a CRL (neither PEM nor DER)")
        if len(der) > MAX_CRL_SIZE:
            raise ValueError(f"{path}: a CRL of {len(der)} bytes is larger than the {MAX_CRL_SIZE} a member accepts")
    return blobs


def _cmd_crl(args: argparse.Namespace) -> int:
    crls = read_crls(args.file)
    path = node_socket(args)[0]
    refused = 0
    for der in crls:
        answer = asyncio.run(_call(path, "membership.crl", crl=b64encode(der)))["crl"]
        if args.json:
            print(json.dumps(answer))
        elif answer.get("applied"):
            print(f"{answer.get('reason')}: the node passes it on to the members")
        if not answer.get("applied"):
            refused += 1
            error(f"the node did not apply the CRL from {args.file}: {answer.get('reason')}")
    return EXIT_FAILED if refused else EXIT_OK


# --- control ops (in the daemon) ----------------------------------------------------------------------
def _membership(client: Any) -> Any:
    from quicmesh.membership.feature import (
        MembershipFeature,  # in the daemon only: a running node has it loaded
    )

    return client.server.node.features.find(MembershipFeature)


async def _op_members(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    return {"members": _membership(client).status()}


async def _op_crl(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    text = _text(request, "crl")
    try:
        der = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise BadRequestError(f"'crl' is not valid base64: {exc}") from None
    if len(der) > MAX_CRL_SIZE:
        raise BadRequestError(f"'crl' is {len(der)} bytes, more than {MAX_CRL_SIZE}")
    return {"crl": _membership(client).publish_crl(der)}


register_ops({"members": _op_members, "membership.crl": _op_crl})
