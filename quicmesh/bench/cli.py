"""``quicmesh bench``: argument parsing and output, over :mod:`.runner`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from quicmesh.bench import IMPLS, MODES
from quicmesh.bench.runner import (
    RELAY_DATAGRAM_SIZE,
    BenchOptions,
    banner,
    render_csv,
    render_durable,
    render_relayed,
    render_text,
    run_bench,
)

BULK_SIZE = 1024 * 1024

EPILOG = """\
The default is a self-started pair on 127.0.0.1: a throwaway CA, one receiving node and --peers sending
nodes, each node in its own process. Modes:
  datagram  unreliable QUIC datagrams; loss %, one-way latency (send to receive)
  message   reliable acknowledged messages (one stream each, 64 in flight per sender); latency = send to ack
  request   sequential request/reply (one at a time per sender); latency = round trip
  bulk      large reliable messages (--size default 1 MiB, 8 in flight); MB/s
  pubsub    subjects: fan-out to 1 and to 3 subscriber nodes, then requests by subject (--msgs per run)
--impl bare runs the same with bare aioquic (the baseline of `python -m quicmesh.bench.compare`).
--relayed runs it twice: direct, then through a relay node (sender and receiver have each other's address
wrong and reach each other only through it), both with max_datagram_size 1452; prints both side by side.
uvloop is used when installed (pip install 'quicmesh[fast]'); --loop asyncio forces the stock loop.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=MODES, default="datagram", help="what to measure (default datagram)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--msgs", type=_positive_int, metavar="N",
                        help="messages to send in all (default 100000; request 10000; bulk 64)")
    amount.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="send for this long instead")
    parser.add_argument("--size", type=_positive_int, metavar="BYTES",
                        help="payload size (default 100; bulk 1048576)")
    parser.add_argument("--rate", type=_positive_float, metavar="N", help="messages per second in all (default: as fast as possible)")
    parser.add_argument("--peers", type=_positive_int, default=1, metavar="N", help="sending processes (default 1)")
    parser.add_argument("--impl", choices=IMPLS, default="quicmesh", help="quicmesh (default) or bare aioquic")
    parser.add_argument("--api", choices=("handler", "public"), default="handler",
                        help="quicmesh receiver: set_receive_handler and a plain request handler (default), or "
                             "public: async for over received() and an async request handler")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop of the bench processes (default: uvloop if installed)")
    parser.add_argument("--timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                        help="give up after this long (default 120)")
    parser.add_argument("--durable", action="store_true",
                        help="message mode: also durable messages with sync=normal and sync=full, side by side")
    parser.add_argument("--relayed", action="store_true",
                        help="direct and then through a third (relay) node, side by side")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the result as one JSON document")
    output.add_argument("--csv", action="store_true", help="print per-peer and aggregate rows as CSV")


def options_from(args: argparse.Namespace) -> BenchOptions:
    size = args.size if args.size is not None else (BULK_SIZE if args.mode == "bulk" else 100)
    return BenchOptions(mode=args.mode, impl=args.impl, msgs=args.msgs, duration=args.duration, size=size,
                        rate=args.rate, peers=args.peers, loop=args.loop, timeout=args.timeout,
                        relayed=args.relayed, api=args.api)


def run(args: argparse.Namespace) -> int:
    if args.mode == "pubsub" and args.relayed:
        args.parser.error("--relayed is for the datagram, message, request and bulk modes")
    if args.mode == "pubsub":
        return _run_pubsub(args)
    options = options_from(args)
    try:
        options.check()
    except ValueError as error:
        args.parser.error(str(error))
    quiet = args.json or args.csv
    if args.durable:
        return _run_durable(options, args, quiet)
    if args.relayed:
        return _run_relayed(options, args, quiet)
    if not quiet:
        print(banner(options), flush=True)
    show = _progress_printer() if not quiet else None
    result = run_bench(options, progress=show)
    if show is not None and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.csv:
        print(render_csv(result))
    else:
        print(render_text(result))
    return 1 if any(p["timed_out"] for p in result["senders"]) else 0


def _run_durable(options: BenchOptions, args: argparse.Namespace, quiet: bool) -> int:
    """Three runs, one after the other: plain messages, durable sync=normal, durable sync=full."""
    runs = [(f", durable sync={durable}" if durable else "", dataclasses.replace(options, durable=durable))
            for durable in (None, "normal", "full")]
    return _run_series(runs, args, quiet, "durable_comparison", render_durable)


def _run_relayed(options: BenchOptions, args: argparse.Namespace, quiet: bool) -> int:
    """Two runs with the same settings: direct, then through a relay node."""
    direct = dataclasses.replace(options, relayed=False, max_datagram_size=RELAY_DATAGRAM_SIZE)
    runs = [(", direct", direct), (", through a relay node", dataclasses.replace(direct, relayed=True))]
    return _run_series(runs, args, quiet, "relayed_comparison", render_relayed)


def _run_series(runs: list[tuple[str, BenchOptions]], args: argparse.Namespace, quiet: bool, key: str,
                render: Any) -> int:
    """Runs one after the other (each labelled in its banner), then ``render`` puts them side by side."""
    for _, run_options in runs:  # all checked before the first starts
        try:
            run_options.check()
        except ValueError as error:
            args.parser.error(str(error))
    results = []
    for label, run_options in runs:
        if not quiet:
            print(banner(run_options) + label, flush=True)
        results.append(run_bench(run_options))
        if not quiet:
            print(render_text(results[-1]), flush=True)
    if args.json:
        print(json.dumps({key: results}, indent=2))
    elif args.csv:
        print("\n".join(render_csv(result) for result in results))
    else:
        print(render(results))
    return 1 if any(p["timed_out"] for result in results for p in result["senders"]) else 0


def _run_pubsub(args: argparse.Namespace) -> int:
    from quicmesh.bench.pubsub import PubSubBenchOptions, render, run_pubsub_bench

    options = PubSubBenchOptions(msgs=args.msgs, size=args.size or 100, loop=args.loop, timeout=args.timeout)
    try:
        options.check()
    except ValueError as error:
        args.parser.error(str(error))
    if not (args.json or args.csv):
        print(f"quicmesh bench: pubsub on {options.host}, {options.size} B payloads, separate processes", flush=True)
    results = run_pubsub_bench(options)
    print(json.dumps({"pubsub": results}, indent=2) if args.json or args.csv else render(results))
    return 0


def _progress_printer() -> Any:
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        if tty:
            sys.stderr.write("\r\033[K  " + line)
        else:
            sys.stderr.write("  progress: " + line + "\n")
        sys.stderr.flush()

    return show


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value <= 1e9:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quicmesh bench", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.parser = parser
    return run(args)
