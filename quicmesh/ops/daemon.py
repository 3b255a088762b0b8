"""`quicmesh run`: one Node, its control socket, and the process plumbing around them.

Signals: SIGTERM/SIGINT stop the node gracefully (a second one exits at once); SIGHUP re-reads the
config file and applies it with ``Node.reload`` (a bad file is logged and the old config kept). A new
version of the certificate, key, CA or CRL file does the same on its own, within a few seconds
(ops/credential_watch.py), and certificates near their expiry or a stale CRL are warned about once.
With NOTIFY_SOCKET set (systemd ``Type=notify``/``notify-reload``) the daemon reports its state, and
with WATCHDOG_USEC set (``WatchdogSec=``) it pings systemd's watchdog at half that interval.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from quicmesh.config import Config, load_config
from quicmesh.errors import ConfigError, IdentityError, QuicmeshError
from quicmesh.durable.feature import DurableReceived
from quicmesh.forwarding.forwarder import Forwarder
from quicmesh.ops import logs
from quicmesh.ops.control import ControlServer, socket_path
from quicmesh.ops.credential_watch import (
    MAX_SETTLE_ROUNDS,
    POLL_INTERVAL,
    SETTLE_DELAY,
    CredentialDates,
    CredentialWarning,
    FileWatch,
)
from quicmesh.ops.logs import fields
from quicmesh.ops.metrics import MetricsServer
from quicmesh.protocol import identity
from quicmesh.protocol.addresses import format_address
from quicmesh.runtime.node import Node

log = logging.getLogger("quicmesh.daemon")

STOP_TIMEOUT = 4.0  # a graceful stop that takes longer than this is abandoned (exit 1)


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


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings: half of systemd's WATCHDOG_USEC, if it is meant for us."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # set for another process (we were started by a wrapper)
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def tls_files(config: Config) -> list[Path]:
    """The files whose new versions the daemon picks up by itself."""
    tls = config.tls
    return [tls.cert, tls.key, tls.ca, *([tls.crl] if tls.crl is not None else [])]


def crl_next_update(config: Config) -> datetime | None:
    """The earliest nextUpdate of the configured CRL file (the node has just loaded it without error)."""
    if config.tls.crl is None:
        return None
    try:
        dates = [crl.next_update_utc for crl in identity.load_crls(config.tls.crl)]
    except IdentityError:  # replaced since the node read it: the watch sees the change and reloads
        return None
    return min((date for date in dates if date is not None), default=None)


class DaemonControl(ControlServer):
    """The daemon's control socket: its status document also lists the credential warnings in force."""

    dates: CredentialDates | None = None  # the credentials in force, set by the daemon once started

    def status(self) -> dict[str, Any]:
        warnings = self.dates.warnings() if self.dates is not None else []
        return {**super().status(), "warnings": [warning.to_dict() for warning in warnings]}


class Daemon:
    """Runs one node until a stop signal; usable from Python as ``await Daemon(path, config).run()``."""

    def __init__(self, config_path: str | os.PathLike[str], config: Config, *,
                 log_level: str | None = None, log_format: str | None = None) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self._log_override = (log_level, log_format)  # command-line flags beat the config's [log]
        self.node = Node(config)
        self.forwarder = Forwarder(self.node)  # UDP service forwarding: [[services]], [[forwards]]
        self.control = DaemonControl(self.node, socket_path(config), max_message_size=config.limits.max_message_size)
        self.control.min_peers = config.health.min_peers
        self.metrics: MetricsServer | None = None  # [metrics] listen: Prometheus endpoint and probes
        self.files = FileWatch(tls_files(config))  # what the node read; taken before it reads them
        self.warned: set[tuple[str, datetime]] = set()  # the warnings logged, so each is logged once
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def dates(self) -> CredentialDates:
        """The dates of the credentials in force (a failed reload leaves the old ones)."""
        assert self.control.dates is not None, "the daemon was not started"
        return self.control.dates

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
        self._credentials_loaded(self.config)
        try:
            await self.forwarder.start()
            await self.control.start()
            if self.config.metrics.listen is not None:
                listen = self.config.metrics.listen
                self.metrics = MetricsServer(self.node, listen.host, listen.port, dates=lambda: self.dates,
                                             min_peers=lambda: self.config.health.min_peers)
                await self.metrics.start()
        except BaseException:
            if self.metrics is not None:
                await self.metrics.close()
            await self.forwarder.stop()
            await self.node.stop("startup failed")
            raise
        self._spawn(self._forward_received())
        self._spawn(self._watch_peers())
        self._spawn(self._watch_files())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        log.info("ready", extra=fields(event="node_ready", node=self.node.name, mesh=self.node.mesh,
                                       listen=format_address(self.node.listen_address),
                                       fingerprint=self.node.fingerprint, peers=len(self.config.peers),
                                       control=str(self.control.path), pid=os.getpid()))
        notify("READY=1", f"STATUS={self._summary()}")
        if (interval := watchdog_interval()) is not None:
            log.info("systemd watchdog on", extra=fields(event="watchdog", interval=interval))
            self._spawn(self._watchdog(interval))
        try:
            await self._stop.wait()
            return await self._shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            log.error("second stop signal: exiting at once", extra=fields(event="node_abort", signal=name))
            self.control.remove_socket()
            os._exit(1)
        log.info("stopping", extra=fields(event="node_stopping", signal=name))
        self._stop.set()

    async def _shutdown(self) -> int:
        notify("STOPPING=1")
        started = time.monotonic()
        code = 0
        await self.forwarder.stop()
        try:
            await asyncio.wait_for(self.node.stop("shutdown"), STOP_TIMEOUT)
        except TimeoutError:
            log.error("node did not stop in time", extra=fields(event="node_stop_timeout", timeout=STOP_TIMEOUT))
            code = 1
        for task in self._tasks:
            task.cancel()
        if self.metrics is not None:
            await self.metrics.close()
        await self.control.close()
        log.info("stopped", extra=fields(event="node_stopped", node=self.node.name,
                                         seconds=round(time.monotonic() - started, 3)))
        return code

    async def reload(self, trigger: str = "signal", changed: list[Path] | None = None) -> None:
        """Re-read the config file and apply it; on any error keep running with the old config.

        ``trigger``: "signal" (SIGHUP) or "file" (``changed`` TLS files have new versions)."""
        async with self._reload_lock:
            notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            seen = FileWatch(self.files.paths)  # the versions about to be read: a later change is seen
            about = {"trigger": trigger, "files": [str(path) for path in changed] if changed else None}
            try:
                new = load_config(self.config_path)
                await self.node.reload(new)
                await self.forwarder.apply(new)  # problems (a port in use) are logged; the rest applies
            except (ConfigError, QuicmeshError, OSError, ValueError) as exc:
                self.files = seen  # not retried until a file changes again
                error = "; ".join(exc.errors) if isinstance(exc, ConfigError) else str(exc)
                log.error("reload failed, keeping the old config",
                          extra=fields(event="reload", result="failed", error=error, **about))
            else:
                self.files = seen if seen.paths == tls_files(new) else FileWatch(tls_files(new))
                if socket_path(new) != self.control.path:
                    log.warning("control.socket changed: restart the node to move it",
                                extra=fields(event="restart_required", key="control.socket",
                                             socket=str(self.control.path)))
                self.config = new
                self.control.min_peers = new.health.min_peers
                self._setup_logging(new)
                self._credentials_loaded(new)
                log.info("reloaded", extra=fields(event="reload", result="ok", peers=len(new.peers),
                                                  fingerprint=self.node.fingerprint, **about))
            finally:
                notify("READY=1", f"STATUS={self._summary()}")

    def _credentials_loaded(self, config: Config) -> None:
        self.control.dates = CredentialDates(self.node.cert_not_after, self.node.ca_not_after,
                                             crl_next_update(config))
        self._check_warnings()

    def _check_warnings(self) -> None:
        """Log each credential warning once when it appears, and once when it clears."""
        current: dict[tuple[str, datetime], CredentialWarning] = {w.key: w for w in self.dates.warnings()}
        for key, warning in current.items():
            if key not in self.warned:
                log.warning(warning.text, extra=fields(event="credential_warning", kind=warning.kind,
                                                       date=warning.date.isoformat(), node=self.node.name))
        for kind, date in self.warned - current.keys():
            log.info("credential warning cleared", extra=fields(event="credential_warning_cleared", kind=kind,
                                                                date=date.isoformat(), node=self.node.name))
        self.warned = set(current)

    def _summary(self) -> str:
        return f"{self.node.name}: {len(self.node.connected_peers())}/{len(self.config.peers)} peers connected"

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_received(self) -> None:
        """Received items to the control socket's listeners. A durable message is acknowledged once a listener's
        copy is written to its socket (a crash before that redelivers it); with no listener it stays
        unacknowledged, and comes again after a restart."""
        async for item in self.node.received():
            written = None
            if isinstance(item, DurableReceived):
                written = functools.partial(_ack, item)
            self.control.publish_received(item.peer, item.kind, item.data, written)

    async def _watch_files(self) -> None:
        """Reload when a TLS file has a new version, once the files stay still a moment (a renew writes the
        certificate, then the key); meanwhile let the clock raise expiry and stale-CRL warnings."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            if not self.files.changed():
                self._check_warnings()
                continue
            for _ in range(MAX_SETTLE_ROUNDS):
                settling = FileWatch(self.files.paths)
                await asyncio.sleep(SETTLE_DELAY)
                if not settling.changed():
                    break
            await self.reload("file", self.files.changed())

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a loop stuck for WatchdogSec gets the node restarted."""
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _watch_peers(self) -> None:
        """Peer events to control clients and systemd's status line (the node logs them itself)."""
        async for event in self.node.events():
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


def _ack(item: DurableReceived) -> None:
    item.ack().add_done_callback(_log_ack_failure)


def _log_ack_failure(ack: asyncio.Future[None]) -> None:
    if not ack.cancelled() and ack.exception() is not None:
        log.error("durable ack not committed", extra=fields(event="durable_ack_failed", error=str(ack.exception())))
