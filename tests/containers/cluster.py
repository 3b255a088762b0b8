"""quicmesh clusters in real rootful podman containers, with real faults.

Used by tests/containers and by hand (run from the repository root, as root):

    python -m tests.containers.cluster up 5 [--name NAME] [--no-build]
    python -m tests.containers.cluster status [--name NAME]
    python -m tests.containers.cluster down [--name NAME]

Every node gets its own container on an `--internal` network with a subnet of its own (nothing routes off
the machine), a static IP and MAC (a restarted node keeps both: no stale ARP at its peers), and
`--add-host` for each peer (aardvark-dns is slow to learn names when containers start together).
Node containers stay unprivileged (read-only root, all capabilities dropped): faults are applied from the
host inside each container's network namespace with `nsenter`, using iptables (random loss, partitions)
and `tc tbf` (bandwidth); this kernel has no netem. See shared/CONTAINERS-NOTES.md for why each podman option is there.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import concurrent.futures
import hashlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/quicmesh-base:bookworm"
IMAGE = "localhost/quicmesh:test"
NODE_UID = 10001
PORT = 4433
CONFIG_DIR = "/etc/quicmesh"
# What goes into the image: a change to any of these rebuilds it, nothing else does.
SOURCE_GLOBS = ("pyproject.toml", "README.md", "quicmesh/**/*.py", "pki/**/*.py", "deploy/Containerfile")
HASH_LABEL = "io.quicmesh.source-hash"
CLUSTER_LABEL = "io.quicmesh.cluster"
OWNER_LABEL = "io.quicmesh.owner-pid"  # "0": made by the CLI, removed only by `down`
WORKDIR_LABEL = "io.quicmesh.workdir"
CLI_STATE = Path("/var/tmp/quicmesh-cluster")
# /24s for our networks: inside podman's default 10.89.0.0/16 pool, above the low ones podman hands out.
SUBNET_CANDIDATES = tuple(f"10.89.{i}.0/24" for i in range(100, 255))
# Test timers (docs/CONFIG.md): a dead peer is noticed in ~3 s instead of waiting for QUIC's idle timeout.
TEST_TIMERS = {"keepalive": 1.0, "dead_after": 3.0}


class ClusterError(RuntimeError):
    """A podman/host command the harness relies on failed; the message carries its stderr."""


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60, input: bytes | None = None,
        ) -> subprocess.CompletedProcess[bytes]:
    """Run a host command, raising ClusterError with its output when it fails."""
    try:
        proc = subprocess.run(list(cmd), input=input, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
    if check and proc.returncode != 0:
        raise ClusterError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.decode(errors='replace')}"
                           f"{proc.stdout.decode(errors='replace')}")
    return proc


# ---------------------------------------------------------------------------------------------- image

def source_hash(repo: Path = REPO) -> str:
    """Hash of the files that make the image, so an unchanged checkout reuses the cached image."""
    digest = hashlib.sha256()
    for pattern in SOURCE_GLOBS:
        for path in sorted(repo.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_image(image: str = IMAGE, base: str = BASE_IMAGE, *, force: bool = False,
                log: Callable[[str], None] = print) -> bool:
    """Build `image` from the current checkout unless one built from the same sources exists.

    The image build runs without network (none is reachable from it here): wheels of quicmesh and its
    dependencies are made on the host by this interpreter, which must be 3.11 like the image's python3.
    Returns whether it built.
    """
    wanted = source_hash()
    if not force:
        proc = run(["podman", "image", "inspect", "--format", f'{{{{index .Labels "{HASH_LABEL}"}}}}', image],
                   check=False)
        if proc.returncode == 0 and proc.stdout.decode().strip() == wanted:
            return False
    if sys.version_info[:2] != (3, 11):
        raise ClusterError(f"wheels must be built by Python 3.11 (the image's), not {sys.version.split()[0]}")
    if run(["podman", "image", "exists", base], check=False).returncode != 0:
        raise ClusterError(f"base image {base} missing: run `bash .ci/setup-containers.sh` as root")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="quicmesh-image-") as tmp:
        src, ctx = Path(tmp, "src"), Path(tmp, "ctx")
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for package in ("quicmesh", "pki"):
            shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
             "--wheel-dir", str(ctx / "wheels"), str(src)], timeout=300)
        shutil.copy2(REPO / "deploy" / "Containerfile", ctx / "Containerfile")
        run(["podman", "build", "--quiet", "--format", "docker", "--network", "none",
             "--build-arg", f"BASE_IMAGE={base}", "--label", f"{HASH_LABEL}={wanted}",
             "--tag", image, str(ctx)], timeout=300)
    # Images of older sources lost their tag to this one: drop those no container uses (~50 MB each).
    run(["podman", "image", "prune", "--force", "--filter", f"label={HASH_LABEL}"], check=False)
    log(f"built {image} ({wanted}) in {time.monotonic() - started:.1f}s")
    return True


# -------------------------------------------------------------------------------------------- cluster

@dataclass(frozen=True)
class Member:
    """One node of a cluster: its mesh name, container and fixed addresses."""

    name: str
    container: str
    ip: str
    mac: str
    config_dir: Path


@dataclass
class Measurements:
    """Thread-safe collector for numbers tests want printed at the end of the session."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, what: str, value: str) -> None:
        with self._lock:
            self.rows.append((what, value))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _network_labels(name: str) -> dict[str, str]:
    proc = run(["podman", "network", "inspect", "--format", "{{json .Labels}}", name], check=False)
    return (json.loads(proc.stdout) or {}) if proc.returncode == 0 else {}


def list_clusters() -> dict[str, dict[str, str]]:
    """Clusters made by this harness that still have a network: name -> labels."""
    proc = run(["podman", "network", "ls", "--filter", f"label={CLUSTER_LABEL}", "--format", "{{.Name}}"])
    return {name: _network_labels(name) for name in proc.stdout.decode().split()}


def remove_cluster(name: str, workdir: str | None = None) -> None:
    """Remove a cluster's containers, network and files; safe to call twice or on a half-made cluster."""
    proc = run(["podman", "ps", "-aq", "--filter", f"label={CLUSTER_LABEL}={name}"], check=False)
    ids = proc.stdout.decode().split()
    if ids:
        run(["podman", "rm", "-f", "-v", "-t", "0", *ids], check=False, timeout=120)
    run(["podman", "network", "rm", "-f", name], check=False, timeout=60)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def remove_leftovers(prefix: str) -> list[str]:
    """Remove clusters named `prefix-*` whose creating process is gone (a killed earlier run)."""
    removed = []
    for name, labels in list_clusters().items():
        owner = int(labels.get(OWNER_LABEL, "0") or 0)
        if name.startswith(prefix + "-") and owner and not _alive(owner):
            remove_cluster(name, labels.get(WORKDIR_LABEL))
            removed.append(name)
    return removed


def _used_subnets() -> set[ipaddress.IPv4Network]:
    used = set()
    # One listing (not ls + inspect): another run may remove a network in between.
    for net in json.loads(run(["podman", "network", "ls", "--format", "json"]).stdout or b"[]"):
        for subnet in net.get("subnets") or []:
            used.add(ipaddress.ip_network(subnet["subnet"], strict=False))
    for line in run(["ip", "-4", "route", "show"]).stdout.decode().splitlines():
        dest = line.split()[0]
        if dest != "default":
            used.add(ipaddress.ip_network(dest if "/" in dest else dest + "/32", strict=False))
    return used


class Cluster:
    """N quicmesh nodes in containers; a context manager that removes everything it made.

    `command`/`entrypoint` replace the daemon, and `pki=False` skips `quicmesh-pki bootstrap`: that is how
    the harness tests itself with plain UDP programs.
    """

    def __init__(self, size: int, *, prefix: str = "qmtest", name: str | None = None, image: str = IMAGE,
                 mesh: str = "test", timers: dict[str, float] | None = None,
                 entrypoint: str | None = None, command: Sequence[str] = (), pki: bool = True,
                 persistent: bool = False):
        if not 1 <= size <= 50:
            raise ValueError("size must be 1..50")
        self.size, self.prefix, self.image, self.mesh = size, prefix, image, mesh
        self.name = name or f"{prefix}-{os.getpid()}-{random.randrange(16**4):04x}"
        self.timers = dict(TEST_TIMERS if timers is None else timers)
        self.entrypoint, self.command, self.pki = entrypoint, list(command), pki
        self.persistent = persistent  # CLI clusters outlive this process
        self.members: dict[str, Member] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.started_at = self.up_at = 0.0
        self.workdir: Path | None = None
        self._faults: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        self._removed = False
        self._old_sigterm: Any = None

    # -- lifecycle
    def __enter__(self) -> Cluster:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # A plain SIGTERM would skip every finally: turn it into SystemExit so cleanup runs.
            self._old_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        atexit.register(self.down)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Create the network, the PKI and one running container per node."""
        remove_leftovers(self.prefix)
        if self.persistent:
            CLI_STATE.mkdir(parents=True, exist_ok=True)
            self.workdir = CLI_STATE / self.name
            self.workdir.mkdir()
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._create_network()
        hosts = list(self.subnet.hosts())  # type: ignore[union-attr]
        for i in range(1, self.size + 1):
            ip = hosts[9 + i]  # .11, .12, ...; .1 is the bridge
            name = f"node{i}"
            mac = "02:51:" + ":".join(f"{b:02x}" for b in ip.packed)
            self.members[name] = Member(name, f"{self.name}-{name}", str(ip), mac, self.workdir / "pki" / name)
        if self.pki:
            self._bootstrap()
        else:
            for member in self.members.values():
                member.config_dir.mkdir(parents=True)
        self.started_at = time.time()  # the first node's start, for convergence timings
        for member in self.members.values():
            self._run_container(member)
        self.up_at = time.time()  # the last node's start

    def down(self) -> None:
        """Remove containers, network and files (idempotent; also runs at exit and on SIGTERM)."""
        if self._removed:
            return
        self._removed = True
        remove_cluster(self.name, str(self.workdir) if self.workdir else None)
        atexit.unregister(self.down)
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)

    def _create_network(self) -> None:
        used = _used_subnets()
        free = [s for s in SUBNET_CANDIDATES
                if not any(ipaddress.ip_network(s).overlaps(u) for u in used)]
        random.shuffle(free)  # concurrent runs rarely race for the same one; a loser retries the next
        for subnet in free[:10]:
            proc = run(["podman", "network", "create", "--internal", "--disable-dns", "--subnet", subnet,
                        "--label", f"{CLUSTER_LABEL}={self.name}",
                        "--label", f"{OWNER_LABEL}={0 if self.persistent else os.getpid()}",
                        "--label", f"{WORKDIR_LABEL}={self.workdir}", self.name], check=False)
            if proc.returncode == 0:
                self.subnet = ipaddress.ip_network(subnet)
                return
        raise ClusterError("no free 10.89.x.0/24 subnet for the test network")

    def _bootstrap(self) -> None:
        """`quicmesh-pki bootstrap` at the static IPs, test timers appended, files owned by the node uid."""
        assert self.workdir is not None
        pki = Path(sys.executable).with_name("quicmesh-pki")
        tool = str(pki) if pki.exists() else shutil.which("quicmesh-pki")
        if tool is None:
            raise ClusterError("quicmesh-pki not found next to this Python nor on PATH")
        nodes = [f"{m.name}={m.ip}:{PORT}" for m in self.members.values()]
        run([tool, "bootstrap", self.mesh, *nodes, "--out", str(self.workdir / "pki")])
        for member in self.members.values():
            if self.timers:
                with open(member.config_dir / "node.toml", "a") as toml:
                    toml.write("\n[timers]\n" + "".join(f"{k} = {v}\n" for k, v in self.timers.items()))
            for path in [member.config_dir, *member.config_dir.rglob("*")]:
                os.chown(path, NODE_UID, NODE_UID)

    def _run_container(self, member: Member) -> None:
        cmd = ["podman", "run", "--detach", "--name", member.container, "--hostname", member.name,
               "--init", "--no-healthcheck",  # health is polled by the harness; podman's timers need systemd
               "--network", self.name, "--ip", member.ip, "--mac-address", member.mac,
               "--read-only", "--tmpfs", "/run/quicmesh:rw,nosuid,nodev,mode=1777",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--volume", f"{member.config_dir}:{CONFIG_DIR}:ro",
               "--label", f"{CLUSTER_LABEL}={self.name}"]
        for peer in self.members.values():
            if peer is not member:
                cmd += ["--add-host", f"{peer.name}:{peer.ip}"]
        if self.entrypoint:
            cmd += ["--entrypoint", self.entrypoint]
        run([*cmd, self.image, *self.command], timeout=60)

    # -- inspection and helpers
    def __getitem__(self, node: str) -> Member:
        return self.members[node]

    def names(self) -> list[str]:
        return list(self.members)

    def exec(self, node: str, *args: str, input: bytes | None = None, timeout: float = 30,
             check: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside a node's container (as the node user)."""
        return run(["podman", "exec", "-i", self[node].container, *args], input=input, timeout=timeout,
                   check=check)

    def popen(self, node: str, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a long-running command inside a node's container (stdin/stdout/stderr pipes)."""
        kwargs.setdefault("stdin", subprocess.PIPE)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(["podman", "exec", "-i", self[node].container, *args], **kwargs)

    def logs(self, node: str, tail: int = 50) -> str:
        proc = run(["podman", "logs", "--tail", str(tail), self[node].container], check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")

    def status(self, node: str, timeout: float = 10) -> dict[str, Any] | None:
        """`quicmesh status --json` of a node, or None when its daemon does not answer."""
        try:
            proc = self.exec(node, "quicmesh", "status", "--json", timeout=timeout)
        except ClusterError:
            return None
        if proc.returncode not in (0, 2):
            return None
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return None

    def status_all(self, nodes: Iterable[str] | None = None) -> dict[str, dict[str, Any] | None]:
        """Status of several nodes, queried concurrently (each `podman exec` costs ~0.2 s)."""
        nodes = list(nodes or self.members)
        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
            return dict(zip(nodes, pool.map(self.status, nodes), strict=True))

    def full_mesh(self, nodes: Iterable[str] | None = None) -> bool:
        """Whether each of `nodes` (default all) is connected to every other node of the cluster."""
        for node, status in self.status_all(nodes).items():
            want = set(self.members) - {node}
            if status is None or {p["name"] for p in status["peers"] if p["state"] == "connected"} != want:
                return False
        return True

    def send(self, src: str, dst: str, data: str, *, datagram: bool = False, timeout: float = 30,
             ) -> subprocess.CompletedProcess[bytes]:
        args = ["quicmesh", "send", dst, *(["--datagram"] if datagram else []), data]
        return self.exec(src, *args, timeout=timeout)

    def send_lines(self, src: str, dst: str, lines: Iterable[str], *, timeout: float = 120,
                   ) -> subprocess.CompletedProcess[bytes]:
        """One reliable message per line through `quicmesh send --lines -`; returns once all are acked."""
        payload = "".join(line + "\n" for line in lines).encode()
        return self.exec(src, "quicmesh", "send", dst, "--lines", "-", input=payload, timeout=timeout)

    def watch_peers(self, node: str) -> PeerWatch:
        """Follow a node's connected peers through its own events (see PeerWatch)."""
        return PeerWatch(self, node)

    def listen(self, node: str, *, kind: str | None = None, timeout: float = 300) -> Listener:
        """Start `quicmesh listen --json` in a node; returns once it is subscribed."""
        return Listener(self, node, kind=kind, timeout=timeout)

    # -- faults
    def pid(self, node: str) -> int:
        """Host PID of the container's init: the handle on its network namespace."""
        proc = run(["podman", "inspect", "--format", "{{.State.Pid}}", self[node].container])
        pid = int(proc.stdout.decode().strip())
        if pid <= 0:
            raise ClusterError(f"{node} is not running")
        return pid

    def netns(self, node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a host tool (iptables, tc, ip) inside a node's network namespace."""
        return run(["nsenter", "-t", str(self.pid(node)), "-n", *cmd], check=check)

    def _add_rules(self, fault: str, rules: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        """Append DROP rules to the QM-FAULT chain (hooked on eth0 input) of each given node.

        Faults drop on the receiving side only: a DROP on OUTPUT makes the sender's sendto() fail with
        EPERM, which real loss never does (and this kernel has no tc action to drop silently on egress).
        """
        for node, rule in rules:
            if self.netns(node, "iptables", "-N", "QM-FAULT", check=False).returncode == 0:
                self.netns(node, "iptables", "-I", "INPUT", "-i", "eth0", "-j", "QM-FAULT")
            self.netns(node, "iptables", "-A", "QM-FAULT", *rule, "-j", "DROP")
            self._faults.setdefault(fault, []).append((node, rule))

    def _remove_rules(self, fault: str) -> None:
        """Delete a fault's rules (those of a node restarted since are already gone with its netns)."""
        for node, rule in self._faults.pop(fault, []):
            try:
                self.netns(node, "iptables", "-D", "QM-FAULT", *rule, "-j", "DROP", check=False)
            except ClusterError:
                pass  # node not running: nothing to undo

    def _others(self, node: str) -> list[str]:
        return [n for n in self.members if n != node]

    def partition(self, a: str, b: str) -> None:
        """Cut all traffic between a and b, both directions."""
        self._add_rules(f"partition:{min(a, b)}:{max(a, b)}",
                        [(a, ("-s", self[b].ip)), (b, ("-s", self[a].ip))])

    def heal(self, a: str, b: str) -> None:
        """Undo partition(a, b)."""
        self._remove_rules(f"partition:{min(a, b)}:{max(a, b)}")

    def isolate(self, node: str) -> None:
        """Cut a node off from every other node (all must be running)."""
        self._add_rules(f"isolate:{node}",
                        [(node, ()), *((other, ("-s", self[node].ip)) for other in self._others(node))])

    def rejoin(self, node: str) -> None:
        """Undo isolate(node)."""
        self._remove_rules(f"isolate:{node}")

    def loss(self, node: str, percent: float) -> None:
        """Lose `percent` % of the packets to and from `node` at random (0 removes the fault)."""
        self._remove_rules(f"loss:{node}")
        if percent > 0:
            chance = ("-m", "statistic", "--mode", "random", "--probability", f"{percent / 100:.4f}")
            self._add_rules(f"loss:{node}", [(node, chance), *((other, ("-s", self[node].ip, *chance))
                                                               for other in self._others(node))])

    def bandwidth(self, node: str, rate: str | None) -> None:
        """Limit the node's egress to `rate` (tc syntax: "8mbit"); None removes the limit."""
        if rate is None:
            self.netns(node, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        else:
            self.netns(node, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                       "burst", "32kbit", "latency", "200ms")

    def kill(self, node: str) -> None:
        run(["podman", "kill", "--signal", "KILL", self[node].container])
        run(["podman", "wait", self[node].container], check=False, timeout=30)

    def start(self, node: str) -> None:
        run(["podman", "start", self[node].container], timeout=60)

    def stop(self, node: str, timeout: int = 10) -> None:
        """Graceful stop: SIGTERM (through --init), SIGKILL after `timeout` s."""
        run(["podman", "stop", "--time", str(timeout), self[node].container], timeout=timeout + 60)

    def restart(self, node: str, timeout: int = 10) -> None:
        """Graceful stop (SIGTERM, then KILL after `timeout` s) and start again."""
        run(["podman", "restart", "--time", str(timeout), self[node].container], timeout=timeout + 60)

    def pause(self, node: str) -> None:
        run(["podman", "pause", self[node].container])

    def unpause(self, node: str) -> None:
        run(["podman", "unpause", self[node].container])


class Listener:
    """`quicmesh listen --json` inside a node, its items collected on the host with their arrival time.

    Containers share the host's clock, so a sender that embeds time.time() in a payload gives the
    receiver a one-way latency. stop() kills the listener inside the container: killing only the
    `podman exec` client would leave it running and consuming items.
    """

    def __init__(self, cluster: Cluster, node: str, *, kind: str | None = None, timeout: float = 300):
        self.cluster, self.node = cluster, node
        args = ["quicmesh", "listen", "--json", "--timeout", str(timeout), *(["--kind", kind] if kind else [])]
        self.proc = cluster.popen(node, "sh", "-c", 'echo $$; exec "$@"', "listen", *args,
                                  stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.pid = int(self.proc.stdout.readline())
        self.items: list[tuple[float, dict[str, Any]]] = []  # (arrival time.time(), item with bytes data)
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read_items, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()
        if not self._ready.wait(15):
            self.stop()
            raise ClusterError(f"listen on {node} did not start: {self.stderr}")

    def _read_items(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            arrived = time.time()
            item = json.loads(line)
            item["data"] = base64.b64decode(item["data"])
            with self._changed:
                self.items.append((arrived, item))
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(line.decode(errors="replace").rstrip())
            if b"listening on" in line:
                self._ready.set()
        self._ready.set()  # exited: stop waiting

    def wait_for(self, predicate: Callable[[list[tuple[float, dict[str, Any]]]], bool], timeout: float) -> bool:
        """Wait until predicate(items) holds; False after `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.items), timeout)

    def stop(self) -> None:
        run(["podman", "exec", self.cluster[self.node].container, "sh", "-c", f"kill {self.pid}"], check=False)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for thread in self._threads:
            thread.join(timeout=15)


# Runs inside a node: subscribes to its daemon's peer events (docs/CONTROL.md), then prints the current
# connected set and every change, each stamped with time.time() (containers share the host clock).
# Event-driven, so timings are exact to the millisecond and polling does not load the 2 cores.
PEER_WATCHER = """
import asyncio, json, os, sys, time
from quicmesh.ops.control import ControlClient

async def main():
    deadline = time.time() + float(sys.argv[1])
    while True:  # a node that was just (re)started may not have its control socket yet
        try:
            client = await ControlClient.connect(os.environ["QUICMESH_CONTROL_SOCKET"])
            break
        except Exception:
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.02)
    async with client:
        await client.listen(["peer"])
        status = await client.status()
        connected = [p["name"] for p in status["peers"] if p["state"] == "connected"]
        print(json.dumps({"t": time.time(), "connected": connected}), flush=True)
        async for event in client.events():
            if event.get("event") == "peer":
                print(json.dumps({"t": time.time(), "peer": event["peer"], "kind": event["kind"],
                                  "reason": event.get("reason")}), flush=True)

asyncio.run(main())
"""


class PeerWatch:
    """The connected peers of one node over time, from its daemon's own peer events."""

    def __init__(self, cluster: Cluster, node: str, *, connect_timeout: float = 20):
        self.node = node
        self.connected: set[str] | None = None  # None until the watcher has subscribed
        self.history: list[tuple[float, frozenset[str]]] = []  # (time.time(), connected set after it)
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self.cluster = cluster
        self.proc = cluster.popen(node, "sh", "-c", 'echo $$; exec "$@"', "watch", "python3", "-c", PEER_WATCHER,
                                  str(connect_timeout), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = int(self.proc.stdout.readline() or 0)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            with self._changed:
                if "connected" in event:
                    self.connected = set(event["connected"])
                else:
                    self.events.append(event)
                    assert self.connected is not None
                    (self.connected.add if event["kind"] == "connected" else self.connected.discard)(event["peer"])
                self.history.append((event["t"], frozenset(self.connected)))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait(self, predicate: Callable[[set[str]], bool], timeout: float, since: float = 0.0) -> float | None:
        """time.time() at which predicate(connected peers) first held at or after `since` (the state
        then counts too), waiting up to `timeout` s; None if it did not."""
        def first() -> float | None:
            before = [peers for t, peers in self.history if t < since]
            if before and predicate(set(before[-1])):
                return since
            return next((t for t, peers in self.history if t >= since and predicate(set(peers))), None)
        with self._changed:
            self._changed.wait_for(lambda: first() is not None or self.proc.poll() is not None, timeout)
            return first()

    def stop(self) -> None:
        if self.pid:
            run(["podman", "exec", self.cluster[self.node].container, "sh", "-c", f"kill {self.pid}"], check=False)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> float:
    """Poll until predicate() is truthy; return the seconds it took, TimeoutError after `timeout`."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.containers.cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the image if the sources changed, start N nodes")
    up.add_argument("size", type=int)
    up.add_argument("--no-build", action="store_true", help=f"use {IMAGE} as it is")
    for p in (up, sub.add_parser("status", help="quicmesh status of every node"),
              sub.add_parser("down", help="remove the cluster")):
        p.add_argument("--name", default="qmcli", help="cluster name (default qmcli)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (rootful podman, nsenter)")

    if args.command == "up":
        if not args.no_build:
            build_image()
        if args.name in list_clusters():
            parser.error(f"cluster {args.name} exists: `down --name {args.name}` first")
        cluster = Cluster(args.size, name=args.name, persistent=True)
        try:
            cluster.up()
        except BaseException:
            cluster.down()
            raise
        for m in cluster.members.values():
            print(f"{m.name:8} {m.ip:15} {m.container}   config: {m.config_dir}")
        print(f"network {cluster.name} ({cluster.subnet}); e.g. "
              f"podman exec {cluster['node1'].container} quicmesh status")
        return 0

    labels = list_clusters().get(args.name)
    if labels is None:
        print(f"no cluster named {args.name}", file=sys.stderr)
        return 1
    if args.command == "down":
        remove_cluster(args.name, labels.get(WORKDIR_LABEL))
        print(f"removed {args.name}")
        return 0
    ids = run(["podman", "ps", "-a", "--filter", f"label={CLUSTER_LABEL}={args.name}",
               "--format", "{{.Names}}"]).stdout.decode().split()
    worst = 0
    for container in sorted(ids):
        proc = run(["podman", "exec", container, "quicmesh", "status"], check=False)
        print(f"== {container} (exit {proc.returncode})\n{(proc.stdout + proc.stderr).decode().rstrip()}")
        worst = max(worst, proc.returncode)
    return worst


if __name__ == "__main__":
    sys.exit(main())
