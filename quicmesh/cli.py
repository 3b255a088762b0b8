"""The `quicmesh` command: a thin argparse layer over daemon, control, status and demo.

Every user mistake ends as one `quicmesh: error: ...` line on stderr and a non-zero exit status; a
traceback means a bug. Client commands import neither aioquic nor the node, so a health check that
runs every few seconds stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import os
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quicmesh import __version__
from quicmesh.errors import ConfigError, IdentityError, QuicmeshError
from quicmesh.ops.control import (CLIENT_LINE_LIMIT, REPLY_TIMEOUT, SOCKET_ENV, ControlClient, NodeUnreachableError,
                                  fetch_status, socket_path)
from quicmesh.ops.logs import FORMATS, LEVELS
from quicmesh.ops.status import (EXIT_DEGRADED, EXIT_HEALTHY, EXIT_UNREACHABLE, EXIT_USAGE, exit_code, problem_summary,
                                 render)
from quicmesh.protocol.dates import CERT_WARNING_DAYS, days_left

if TYPE_CHECKING:
    from quicmesh.config import Config

EXIT_OK, EXIT_FAILED, EXIT_BAD_USAGE = 0, 1, 2
STATUS_POLL = 0.2       # seconds between two polls of `status --wait`
SEND_WINDOW = 64        # `send --lines`: messages awaiting their acknowledgement at once

STATUS_EPILOG = f"""\
exit status:
  {EXIT_HEALTHY}  healthy: every configured peer is connected (also with no peers)
  {EXIT_UNREACHABLE}  unreachable: no node answers on the control socket
  {EXIT_DEGRADED}  degraded: the node runs, but some configured peer is not connected
  {EXIT_USAGE}  bad usage, or the config file is unusable

As a container health check:  quicmesh status --check   (with ${SOCKET_ENV} or -c set)
"""

COMMON_EPILOG = f"""\
exit status: {EXIT_OK} success, {EXIT_FAILED} failure (unreachable node, peer error, timeout),
{EXIT_BAD_USAGE} bad usage or invalid config.
The control socket is --socket, else ${SOCKET_ENV}, else control.socket of the -c config.
"""


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line and exits with the command's usage status."""

    usage_exit = EXIT_BAD_USAGE

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(self.usage_exit, f"quicmesh: error: {message} (see `{self.prog} --help`)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"seconds must be between 0 and 86400, got {text}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


#: Modules whose ``add_commands(command, target)`` adds a feature's subcommands (one line per feature).
FEATURE_COMMANDS: tuple[str, ...] = ()


def build_parser() -> _Parser:
    parser = _Parser(prog="quicmesh", description="A secure full mesh over QUIC: run a node and talk to it.")
    parser.add_argument("--version", action="version", version=f"quicmesh {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, run: Any, epilog: str = COMMON_EPILOG) -> _Parser:
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run, parser=sub)
        return sub

    def target(sub: _Parser) -> None:
        where = sub.add_mutually_exclusive_group()
        where.add_argument("-c", "--config", metavar="node.toml", help="the node's config (for control.socket)")
        where.add_argument("--socket", metavar="PATH", help="the node's control socket")

    run = command("run", "run a node (the daemon) until SIGTERM; SIGHUP reloads the config", _cmd_run)
    run.add_argument("-c", "--config", metavar="node.toml", required=True)
    run.add_argument("--log-level", choices=LEVELS, help="overrides [log] level")
    run.add_argument("--log-format", choices=FORMATS, help="overrides [log] format")

    check = command("check-config", "validate a config and its certificates; print the resolved config",
                    _cmd_check_config)
    check.add_argument("-c", "--config", metavar="node.toml", required=True)
    check.add_argument("--json", action="store_true", help="print a JSON report instead")

    status = command("status", "show a running node's peers; exit status says whether it is healthy",
                     _cmd_status, STATUS_EPILOG)
    status.usage_exit = EXIT_USAGE
    target(status)
    status.add_argument("--json", action="store_true", help="print the status document (schema 1) as JSON")
    status.add_argument("--check", action="store_true",
                        help="print nothing when healthy, one line on stderr otherwise (for health checks)")
    status.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS",
                        help="poll until healthy, for at most this long")

    send = command("send", "send a message (or a datagram) to a peer", _cmd_send)
    target(send)
    send.add_argument("peer")
    send.add_argument("data", metavar="DATA", help="the payload, or - to read standard input")
    send.add_argument("--datagram", action="store_true", help="unreliable datagram instead of a message")
    send.add_argument("--lines", action="store_true", help="send each line of DATA (or stdin) separately")
    send.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                      help="how long to wait for each acknowledgement (default 10)")

    request = command("request", "send a request to a peer and print its reply", _cmd_request)
    target(request)
    request.add_argument("peer")
    request.add_argument("data", metavar="DATA", help="the request body, or - to read standard input")
    request.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS", help="default 5")

    listen = command("listen", "print the datagrams and messages a node receives", _cmd_listen,
                     COMMON_EPILOG + "With --count, exit 1 if the timeout comes first.\n")
    target(listen)
    listen.add_argument("--json", action="store_true", help='JSON lines: {"peer", "kind", "data" (base64)}')
    listen.add_argument("--count", type=_count, metavar="N", help="exit after N items")
    listen.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="exit after this long")
    listen.add_argument("--kind", choices=("datagram", "message"), help="only this kind")

    demo = command("demo", "start a throwaway 3-node mesh on 127.0.0.1 and show it working", _cmd_demo)
    demo.add_argument("--nodes", type=_count, default=3, metavar="N", help="how many nodes (2-8, default 3)")
    demo.add_argument("--keep", action="store_true", help="leave the nodes running and say how to use them")

    from quicmesh.bench import cli as bench_cli  # argparse only: the bench processes import aioquic themselves

    bench = command("bench", "measure datagram, message, request and bulk rates, loss and latency on loopback",
                    _cmd_bench, bench_cli.EPILOG)
    bench_cli.add_arguments(bench)

    # Each feature's commands live with the feature: its module's add_commands(command, target) adds them
    # (argparse only at import: a client command must not load aioquic or cryptography).
    for module in FEATURE_COMMANDS:
        importlib.import_module(module).add_commands(command, target)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except ConfigError as exc:
        for line in config_error_lines(exc):
            _error(line)
        return args.parser.usage_exit
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `quicmesh listen | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (QuicmeshError, OSError, ValueError) as exc:
        _error(str(exc))
        return EXIT_FAILED


def _error(message: str) -> None:
    print(f"quicmesh: error: {message}", file=sys.stderr, flush=True)


def config_error_lines(exc: ConfigError) -> list[str]:
    return [f"{exc.source}: {error}" if exc.source else error for error in exc.errors]


# --- run, check-config ----------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    from quicmesh.config import load_config

    config = load_config(args.config)
    from quicmesh.ops.daemon import run  # the node (and aioquic) only for the commands that need them

    return run(args.config, config, log_level=args.log_level, log_format=args.log_format)


def check_credentials(config: Config) -> tuple[dict[str, Any], list[str]]:
    """Load cert, key, CA and CRL as the node would, and check the cert is this node's in this mesh.

    Returns facts about the certificate and every problem found (as ``key: message`` lines).
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from quicmesh.protocol import identity

    errors: list[str] = []
    facts: dict[str, Any] = {}

    def attempt(key: str, load: Any) -> Any:
        try:
            return load()
        except (QuicmeshError, OSError, ValueError) as exc:
            errors.append(f"{key}: {exc}")
            return None

    chain = attempt("tls.cert", lambda: identity.load_certificates(config.tls.cert))
    key = attempt("tls.key", lambda: identity.load_private_key(config.tls.key))
    trust = attempt("tls.ca", lambda: identity.TrustPolicy.from_files(
        config.tls.ca, config.node.mesh, crl_path=config.tls.crl, denylist=config.tls.denylist))
    if chain:
        cert = chain[0]
        facts = {"fingerprint": identity.fingerprint(cert),
                 "cert_not_after": cert.not_valid_after_utc.isoformat(),
                 "cert_days_left": days_left(cert.not_valid_after_utc)}
        if key is not None:
            spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
                errors.append(f"tls.key: {config.tls.key} is not the key of the certificate {config.tls.cert}")
        if trust is not None:
            try:
                trust.verify(chain, expect_node=config.node.name)
            except IdentityError as exc:
                errors.append(f"tls.cert: {config.tls.cert}: {exc}")
    return facts, errors


def _cmd_check_config(args: argparse.Namespace) -> int:
    from quicmesh.config import load_config, render_config

    try:
        config = load_config(args.config)
        facts, errors = check_credentials(config)
    except ConfigError as exc:
        config, facts, errors = None, {}, config_error_lines(exc)
    if args.json:
        report: dict[str, Any] = {"ok": not errors, "errors": errors, **facts}
        if config is not None:
            report.update(node=config.node.name, mesh=config.node.mesh, config=config.to_dict())
        print(json.dumps(report, indent=2))
        return EXIT_BAD_USAGE if errors else EXIT_OK
    if errors:
        for line in errors:
            _error(line)
        return EXIT_BAD_USAGE
    assert config is not None
    print(render_config(config))
    days = facts["cert_days_left"]
    peers = ", ".join(p.name for p in config.peers) or "none"
    print(f"OK: node {config.node.name} in mesh {config.node.mesh}; cert {facts['fingerprint']} valid until "
          f"{facts['cert_not_after'][:10]} ({days:.0f} days left); peers: {peers}")
    if days < CERT_WARNING_DAYS:
        print(f"WARNING: the certificate expires in {days:.0f} days: issue a new one soon", file=sys.stderr)
    return EXIT_OK


# --- client commands ------------------------------------------------------------------------------
def _socket(args: argparse.Namespace) -> Path:
    if not (args.socket or args.config or os.environ.get(SOCKET_ENV)):
        args.parser.error(f"which node? give -c node.toml or --socket PATH (or set {SOCKET_ENV})")
    if not args.config:
        return socket_path(explicit=args.socket)
    from quicmesh.config import load_config  # only with -c: a socket path alone needs no config

    return socket_path(load_config(args.config), explicit=args.socket)


async def wait_status(path: Path, wait: float) -> tuple[dict[str, Any] | None, NodeUnreachableError | None]:
    """Poll until the node is healthy or ``wait`` seconds passed: the last status (None if unreachable)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            status, error = await fetch_status(path), None
        except NodeUnreachableError as exc:
            status, error = None, exc
        left = deadline - time.monotonic()
        if exit_code(status) == EXIT_HEALTHY or left <= 0:
            return status, error
        await asyncio.sleep(min(STATUS_POLL, left))


def _cmd_status(args: argparse.Namespace) -> int:
    status, error = asyncio.run(wait_status(_socket(args), args.wait))
    code = exit_code(status)
    if status is None:
        _error(str(error))
    elif args.check:
        if code != EXIT_HEALTHY:
            print(f"quicmesh: degraded: {problem_summary(status)}", file=sys.stderr)
    elif args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return code


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
    path = _socket(args)
    if args.lines:
        return asyncio.run(_send_lines(path, args))
    data = _payload(args.data)

    async def send() -> None:
        async with await ControlClient.connect(path) as client:
            await _acked(client.send(args.peer, data, datagram=args.datagram), args)

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
            await _acked(client.send(args.peer, line, datagram=args.datagram), args)
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
        _error(f"{failure}; {done} of {number} {kind}s {'sent' if args.datagram else 'acknowledged'}")
        return EXIT_FAILED
    what = "all acknowledged" if not args.datagram else "datagrams are not acknowledged"
    print(f"quicmesh: sent {done} {kind}s to {args.peer} in {time.monotonic() - started:.2f}s ({what})",
          file=sys.stderr)
    return EXIT_OK


def _cmd_request(args: argparse.Namespace) -> int:
    path, data = _socket(args), _payload(args.data)

    async def request() -> bytes:
        async with await ControlClient.connect(path) as client:
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
    return asyncio.run(_listen(_socket(args), args))


async def _listen(path: Path, args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else ["datagram", "message"]
    count = 0
    async with await ControlClient.connect(path) as client:
        node = await client.listen(kinds)
        print(f"quicmesh: listening on {node} for {' and '.join(k + 's' for k in kinds)} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        try:
            async with asyncio.timeout(args.timeout):
                async for event in client.events():
                    if event.get("event") == "dropped":
                        print(f"quicmesh: warning: {event.get('count')} items dropped: this listener "
                              "reads too slowly", file=sys.stderr, flush=True)
                    elif event.get("event") == "received":
                        if args.json:
                            line = json.dumps({k: event.get(k) for k in ("peer", "kind", "data")})
                        else:
                            line = f"{event['peer']} {event['kind']} {show_data(base64.b64decode(event['data']))}"
                        print(line, flush=True)
                        count += 1
                        if count == args.count:
                            return EXIT_OK
        except TimeoutError:
            pass
    return EXIT_FAILED if args.count else EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from quicmesh.bench import cli as bench_cli

    return bench_cli.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from quicmesh.ops.demo import run_demo

    if not 2 <= args.nodes <= 8:
        args.parser.error("--nodes must be between 2 and 8")
    return run_demo(nodes=args.nodes, keep=args.keep)
