"""`quicmesh run`: one Node, its control socket, and the process plumbing around them.

Signals: SIGTERM/SIGINT stop the node gracefully (a second one exits at once); SIGHUP re-reads the
config file and applies it with ``Node.reload`` (a bad file is logged and the old config kept).
With NOTIFY_SOCKET set (systemd ``Type=notify``/``notify-reload``) the daemon reports its state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from quicmesh.config import Config, load_config
from quicmesh.errors import ConfigError, QuicmeshError
from quicmesh.forwarding.forwarder import Forwarder
from quicmesh.ops import logs
from quicmesh.ops.control import ControlServer, socket_path
from quicmesh.ops.logs import fields
from quicmesh.ops.metrics import MetricsServer, cert_warnings
from quicmesh.protocol.addresses import format_address
from quicmesh.runtime.node import Node

log = logging.getLogger("quicmesh.daemon")

STOP_TIMEOUT = 4.0  # a graceful stop that takes longer than this is abandoned (exit 1)
CERT_CHECK_INTERVAL = 12 * 3600.0  # seconds between certificate-expiry checks (warnings in the log)


def notify(*assignments: str) -> bool:
    """Send ``READY=1``-style lines to systemd's notify socket; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        log.warning("cannot notify systemd", extra=fields(socket=address, error=str(exc)))
        return False
    return True


class Daemon:
    """Runs one node until a stop signal; usable from Python as ``await Daemon(path, config).run()``."""

    def __init__(self, config_path: str | os.PathLike[str], config: Config, *,
                 log_level: str | None = None, log_format: str | None = None) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self._log_override = (log_level, log_format)  # command-line flags beat the config's [log]
        self.node = Node(config)
        self.forwarder = Forwarder(self.node)  # UDP service forwarding: [[services]], [[forwards]]
        self.control = ControlServer(self.node, socket_path(config),
                                     max_message_size=config.limits.max_message_size)
        self.metrics: MetricsServer | None = None  # [metrics] listen: Prometheus endpoint
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    def _setup_logging(self, config: Config) -> None:
        level, fmt = self._log_override
        logs.setup(level or config.log.level, fmt or config.log.format)

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop; the process exit status."""
        self._setup_logging(self.config)
        self.node.set_request_handler(self.control.handle_request)
        try:
            await self.node.start()
        except OSError as exc:  # e.g. the UDP port is taken
            raise QuicmeshError(f"cannot start node {self.node.name} on {self.config.node.listen}: "
                                f"{exc.strerror or exc}") from exc
        try:
            await self.forwarder.start()
            await self.control.start()
            if self.config.metrics.listen is not None:
                listen = self.config.metrics.listen
                self.metrics = MetricsServer(self.node, listen.host, listen.port)
                await self.metrics.start()
        except BaseException:
            if self.metrics is not None:
                await self.metrics.close()
            await self.forwarder.stop()
            await self.node.stop("startup failed")
            raise
        self._spawn(self._forward_received())
        self._spawn(self._watch_peers())
        self._spawn(self._watch_certs())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        log.info("ready", extra=fields(node=self.node.name, mesh=self.node.mesh,
                                       listen=format_address(self.node.listen_address),
                                       fingerprint=self.node.fingerprint, peers=len(self.config.peers),
                                       control=str(self.control.path), pid=os.getpid()))
        notify("READY=1", f"STATUS={self._summary()}")
        try:
            await self._stop.wait()
            return await self._shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop.is_set():
            log.error("second stop signal: exiting at once", extra=fields(signal=signal.Signals(signum).name))
            self.control.remove_socket()
            os._exit(1)
        log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
        self._stop.set()

    async def _shutdown(self) -> int:
        notify("STOPPING=1")
        started = time.monotonic()
        code = 0
        await self.forwarder.stop()
        try:
            await asyncio.wait_for(self.node.stop("shutdown"), STOP_TIMEOUT)
        except TimeoutError:
            log.error("node did not stop in time", extra=fields(timeout=STOP_TIMEOUT))
            code = 1
        for task in self._tasks:
            task.cancel()
        if self.metrics is not None:
            await self.metrics.close()
        await self.control.close()
        log.info("stopped", extra=fields(node=self.node.name, seconds=round(time.monotonic() - started, 3)))
        return code

    async def reload(self) -> None:
        """Re-read the config file and apply it; on any error keep running with the old config."""
        async with self._reload_lock:
            notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                new = load_config(self.config_path)
                await self.node.reload(new)
                await self.forwarder.apply(new)  # problems (a port in use) are logged; the rest applies
            except ConfigError as exc:
                for error in exc.errors:
                    log.error("reload failed, keeping the old config", extra=fields(error=error))
            except (QuicmeshError, OSError, ValueError) as exc:
                log.error("reload failed, keeping the old config", extra=fields(error=str(exc)))
            else:
                if socket_path(new) != self.control.path:
                    log.warning("control.socket changed: restart the node to move it",
                                extra=fields(socket=str(self.control.path)))
                self.config = new
                self._setup_logging(new)
                log.info("reloaded", extra=fields(peers=len(new.peers), fingerprint=self.node.fingerprint))
                for warning in cert_warnings(self.node):  # a renewed cert clears it; a forgotten one says so
                    log.warning(warning, extra=fields(node=self.node.name))
            finally:
                notify("READY=1", f"STATUS={self._summary()}")

    def _summary(self) -> str:
        return f"{self.node.name}: {len(self.node.connected_peers())}/{len(self.config.peers)} peers connected"

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_received(self) -> None:
        async for item in self.node.received():
            self.control.publish_received(item.peer, item.kind, item.data)

    async def _watch_certs(self) -> None:
        """Warn in the log, at start and then twice a day, while a certificate expires in < 30 days."""
        while True:
            for warning in cert_warnings(self.node):
                log.warning(warning, extra=fields(node=self.node.name))
            await asyncio.sleep(CERT_CHECK_INTERVAL)

    async def _watch_peers(self) -> None:
        async for event in self.node.events():
            peer = next((p for p in self.node.peers() if p.name == event.peer), None)
            log.info(f"peer {event.kind}", extra=fields(
                peer=event.peer, reason=event.reason, fingerprint=peer.fingerprint if peer else None,
                address=(peer.remote_address or peer.address) if peer else None))
            self.control.publish_peer(event.peer, event.kind, event.reason)
            notify(f"STATUS={self._summary()}")


def run(config_path: str | os.PathLike[str], config: Config, **log_override: str | None) -> int:
    """Run the daemon in a new event loop (what `quicmesh run` does): uvloop when installed (the `fast`
    extra; measured faster, see docs/PERFORMANCE.md) unless QUICMESH_LOOP=asyncio, else asyncio's own."""
    main = Daemon(config_path, config, **log_override).run()
    if os.environ.get("QUICMESH_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
