"""The `quicmesh` command: a thin argparse layer over daemon, control, status, doctor and demo.

Every user mistake ends as one `quicmesh: error: ...` line on stderr and a non-zero exit status; a
traceback means a bug. Client commands import neither aioquic nor the node, so a health check that
runs every few seconds stays cheap. The client commands live in quicmesh.commands.talk, completion and
the man page in quicmesh.commands.manual.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from quicmesh import __version__
from quicmesh.commands import talk
from quicmesh.commands.common import (EXIT_BAD_USAGE, EXIT_FAILED, EXIT_OK, WHERE_HELP, config_path, count, error,
                                      load, node_socket, seconds)
from quicmesh.errors import ConfigError, QuicmeshError
from quicmesh.ops.control import FEATURE_MODULES, NodeUnreachableError, fetch_status
from quicmesh.ops.health import ALL_PEERS, MinPeers, Verdict, parse_min_peers
from quicmesh.ops.logs import FORMATS, LEVELS
from quicmesh.ops.status import exit_code, problem_summary, render, status_rule
from quicmesh.protocol.dates import CERT_WARNING_DAYS

STATUS_POLL = 0.2       # seconds between two polls of `status --wait`

STATUS_EPILOG = f"""\
exit status (the monitoring-plugin convention of Nagios, Icinga, Sensu):
  {Verdict.OK:d} OK        every configured peer is connected (also with no peers)
  {Verdict.WARNING:d} WARNING   some peer is not connected, but at least --min-peers are
  {Verdict.CRITICAL:d} CRITICAL  fewer than --min-peers are connected, or no node answers on the control socket
  {Verdict.UNKNOWN:d} UNKNOWN   bad usage, or the config file is unusable

--min-peers N or P% (of the configured peers); default: the node's [health] min_peers (every peer).
Readiness (min peers met): quicmesh status --check; test $? -le 1
Liveness (the daemon answers): quicmesh status --check --min-peers 0; test $? -le 1
{WHERE_HELP}
"""

COMMON_EPILOG = f"""\
exit status: {EXIT_OK} success, {EXIT_FAILED} failure (unreachable node, peer error, timeout),
{EXIT_BAD_USAGE} bad usage or invalid config.
{WHERE_HELP}
"""

DOCTOR_EPILOG = f"""\
Checks, in order: the config, the files it names (readable, key 0600), this node's certificate against the
clock and the CA, then for each peer (or only PEER): DNS, its UDP port, a QUIC handshake with this node's
credentials, and the identity it proves. Prints the first problem and how to fix it.
exit status: {EXIT_OK} all good, {EXIT_FAILED} a problem was found, {EXIT_BAD_USAGE} bad usage.
"""


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line and exits with the command's usage status."""

    usage_exit = EXIT_BAD_USAGE
    failure_exit = EXIT_FAILED  # any other error the command reports

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(self.usage_exit, f"quicmesh: error: {message} (see `{self.prog} --help`)\n")


def _min_peers(text: str) -> MinPeers:
    try:
        return parse_min_peers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> _Parser:
    parser = _Parser(prog="quicmesh", description="A secure full mesh over QUIC: run a node and talk to it.")
    parser.add_argument("--version", action="version", version=f"quicmesh {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, run: Any, epilog: str = COMMON_EPILOG) -> _Parser:
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run, parser=sub)
        return sub

    def target(sub: _Parser, *, short_config: bool = True) -> None:
        where = sub.add_mutually_exclusive_group()
        flags = ("-c", "--config") if short_config else ("--config",)
        where.add_argument(*flags, metavar="node.toml", help="the node's config (for control.socket)")
        where.add_argument("--socket", metavar="PATH", help="the node's control socket")

    def config_flag(sub: _Parser) -> None:
        sub.add_argument("-c", "--config", metavar="node.toml",
                         help="the node's config (default $QUICMESH_CONFIG, else /etc/quicmesh/node.toml)")

    run = command("run", "run a node (the daemon) until SIGTERM; SIGHUP reloads the config", _cmd_run)
    config_flag(run)
    run.add_argument("--log-level", choices=LEVELS, help="overrides [log] level")
    run.add_argument("--log-format", choices=FORMATS, help="overrides [log] format")

    check = command("check-config", "validate a config and its certificates; print the resolved config",
                    _cmd_check_config)
    config_flag(check)
    quietness = check.add_mutually_exclusive_group()
    quietness.add_argument("--json", action="store_true", help="print a JSON report instead")
    quietness.add_argument("--quiet", action="store_true",
                           help="print nothing when valid (errors and warnings still go to stderr)")

    status = command("status", "show a running node's peers; exit status says whether it is healthy",
                     _cmd_status, STATUS_EPILOG)
    status.usage_exit = status.failure_exit = Verdict.UNKNOWN
    target(status)
    status.add_argument("--json", action="store_true", help="print the status document (schema 1) as JSON")
    status.add_argument("--check", action="store_true",
                        help="print nothing when OK, one line on stderr otherwise (for health checks)")
    status.add_argument("--wait", type=seconds, default=0.0, metavar="SECONDS",
                        help="poll until --min-peers are connected, for at most this long")
    status.add_argument("--min-peers", type=_min_peers, metavar="N|P%",
                        help="connected peers needed for WARNING instead of CRITICAL (default: [health] min_peers)")

    talk.add_commands(command, target, COMMON_EPILOG)

    doctor = command("doctor", "find why this node or a peer does not connect: the first problem and its fix",
                     _cmd_doctor, DOCTOR_EPILOG)
    config_flag(doctor)
    doctor.add_argument("peer", nargs="?", help="check only this peer (default: every configured peer)")
    doctor.add_argument("--timeout", type=seconds, default=3.0, metavar="SECONDS",
                        help="how long a handshake may take (default 3)")

    demo = command("demo", "start a throwaway 3-node mesh on 127.0.0.1 and show it working", _cmd_demo)
    demo.add_argument("--nodes", type=count, default=3, metavar="N", help="how many nodes (2-8, default 3)")
    demo.add_argument("--keep", action="store_true", help="leave the nodes running and say how to use them")

    from quicmesh.bench import cli as bench_cli  # argparse only: the bench processes import aioquic themselves

    bench = command("bench", "measure datagram, message, request and bulk rates, loss and latency on loopback",
                    _cmd_bench, bench_cli.EPILOG)
    bench_cli.add_arguments(bench)

    completion = command("completion", "print a shell completion script (bash, zsh or fish)", _cmd_completion,
                         "bash: source <(quicmesh completion bash)\nzsh:  quicmesh completion zsh > "
                         "\"${fpath[1]}/_quicmesh\"\nfish: quicmesh completion fish > "
                         "~/.config/fish/completions/quicmesh.fish\n")
    completion.add_argument("shell", choices=("bash", "zsh", "fish"))
    command("man", "print the quicmesh(1) manual page (roff): quicmesh man | man -l -", _cmd_man, "")

    # Each feature's commands live with the feature: its module's add_commands(command, target) adds them
    # (argparse only at import: a client command must not load aioquic or cryptography).
    for module in FEATURE_MODULES:
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
            error(line)
        return args.parser.usage_exit
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `quicmesh listen | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (QuicmeshError, OSError, ValueError) as exc:
        error(str(exc))
        return args.parser.failure_exit


def config_error_lines(exc: ConfigError) -> list[str]:
    return [f"{exc.source}: {line}" if exc.source else line for line in exc.errors]


# --- run, check-config, doctor ----------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    config = load(path)
    from quicmesh.ops.daemon import run  # the node (and aioquic) only for the commands that need them

    return run(path, config, log_level=args.log_level, log_format=args.log_format)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from quicmesh.config import render_config
    from quicmesh.ops.doctor import check_credentials

    try:
        config = load(args.config)
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
            error(line)
        return EXIT_BAD_USAGE
    assert config is not None
    days = facts["cert_days_left"]
    if not args.quiet:
        print(render_config(config))
        peers = ", ".join(p.name for p in config.peers) or "none"
        print(f"OK: node {config.node.name} in mesh {config.node.mesh}; cert {facts['fingerprint']} valid until "
              f"{facts['cert_not_after'][:10]} ({days:.0f} days left); peers: {peers}")
    if days < CERT_WARNING_DAYS:
        print(f"WARNING: the certificate expires in {days:.0f} days: issue a new one soon", file=sys.stderr)
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from quicmesh.ops.doctor import run_doctor  # aioquic and cryptography: only this command needs them

    return run_doctor(config_path(args.config), args.peer, timeout=args.timeout)


# --- status -----------------------------------------------------------------------------------------
async def wait_status(path: Path, wait: float, rule: MinPeers | None = None, fallback: MinPeers = ALL_PEERS,
                      ) -> tuple[dict[str, Any] | None, NodeUnreachableError | None]:
    """Poll until the node meets its min-peers rule or ``wait`` seconds passed: the last status (None if
    unreachable). ``rule``: --min-peers; else the node's own; ``fallback`` for a node that reports none."""
    deadline = time.monotonic() + wait
    while True:
        try:
            status, problem = await fetch_status(path), None
        except NodeUnreachableError as exc:
            status, problem = None, exc
        left = deadline - time.monotonic()
        judged = rule or (status_rule(status, fallback) if status is not None else fallback)
        if exit_code(status, judged) <= Verdict.WARNING or left <= 0:
            return status, problem
        await asyncio.sleep(min(STATUS_POLL, left))


def _cmd_status(args: argparse.Namespace) -> int:
    path, config = node_socket(args)
    fallback = config.health.min_peers if config is not None else ALL_PEERS
    status, problem = asyncio.run(wait_status(path, args.wait, args.min_peers, fallback))
    if status is None:
        error(str(problem))
        return Verdict.CRITICAL
    rule = args.min_peers or status_rule(status, fallback)
    code = exit_code(status, rule)
    if args.check:
        if code != Verdict.OK:
            print(f"quicmesh: {code.name}: {problem_summary(status, rule)}", file=sys.stderr)
    elif args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return code


# --- the rest ---------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace) -> int:
    from quicmesh.bench import cli as bench_cli

    return bench_cli.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from quicmesh.ops.demo import run_demo

    if not 2 <= args.nodes <= 8:
        args.parser.error("--nodes must be between 2 and 8")
    return run_demo(nodes=args.nodes, keep=args.keep)


def _cmd_completion(args: argparse.Namespace) -> int:
    from quicmesh.commands.manual import completion

    print(completion(build_parser(), args.shell), end="")
    return EXIT_OK


def _cmd_man(args: argparse.Namespace) -> int:
    from quicmesh.commands.manual import man_page

    print(man_page(build_parser()), end="")
    return EXIT_OK
