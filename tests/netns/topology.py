"""Several real hosts on one machine: Linux network namespaces joined by a bridge, with iptables faults.

For the multi-host features (relay, membership, NAT traversal): each host is a network namespace with one
interface on a private bridge that lives in a switch namespace of its own, so no address or rule of a test ever
touches the machine's own network (nothing routes out). Faults are iptables rules inside a host's namespace; every
rule is checked with ``iptables -C`` after it is added, so a rule that did not take fails the test instead of
letting it pass vacuously.

    with Topology(["a", "b", "c"]) as net:
        net.block("a", "c")                  # a and c no longer reach each other; both still reach b
        net.popen("b", [sys.executable, "-m", "quicmesh", "run", "-c", "b.toml"])
        net.heal("a", "c")

Needs root, ``ip`` (iproute2) and ``iptables``; ``.ci/test`` installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "qmt"  # every namespace and link this harness makes starts with it
#: Each topology has a bridge of its own in a namespace of its own, so every one can use the same subnet; the
#: machine's own namespace never sees it.
_SUBNET = "10.231.0"


class TopologyError(RuntimeError):
    """A namespace, link or rule could not be set up (the message says which command and why)."""


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root; run as root, as CI does"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run the tests with `bash .ci/test` (it installs iproute2 and iptables)"
    return None


def run(command: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise TopologyError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str  # on the bridge


class Topology:
    """Hosts on one bridge; removed on exit (processes killed, namespaces deleted), even when a test fails."""

    _made = 0  # topologies made by this process: part of each one's names

    def __init__(self, hosts: Sequence[str]) -> None:
        if not hosts or len(hosts) > 200 or len(set(hosts)) != len(hosts):
            raise ValueError("hosts: 1 to 200 distinct names")
        Topology._made += 1
        self.tag = f"{os.getpid() % 100000}x{Topology._made}"
        self._switch = f"{PREFIX}{self.tag}-sw"
        self.hosts = {name: Host(name, f"{PREFIX}{self.tag}-{name}", f"{_SUBNET}.{index + 1}")
                      for index, name in enumerate(hosts)}
        self._processes: list[subprocess.Popen[bytes]] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Topology:
        remove_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _build(self) -> None:
        run(["ip", "netns", "add", self._switch])
        self.exec(self._switch, ["ip", "link", "add", "br0", "type", "bridge"])
        self.exec(self._switch, ["ip", "link", "set", "br0", "up"])
        self.exec(self._switch, ["ip", "link", "set", "lo", "up"])
        for index, host in enumerate(self.hosts.values()):
            outer, inner = f"{PREFIX}{self.tag}s{index}"[:15], f"{PREFIX}{self.tag}h{index}"[:15]
            run(["ip", "netns", "add", host.namespace])
            run(["ip", "link", "add", inner, "netns", host.namespace, "type", "veth", "peer", "name", outer,
                 "netns", self._switch])
            self.exec(self._switch, ["ip", "link", "set", outer, "master", "br0", "up"])
            self.exec(host.namespace, ["ip", "link", "set", inner, "name", "eth0"])
            self.exec(host.namespace, ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"])
            self.exec(host.namespace, ["ip", "link", "set", "eth0", "up"])
            self.exec(host.namespace, ["ip", "link", "set", "lo", "up"])

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        for process in self._processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for namespace in [*(host.namespace for host in self.hosts.values()), self._switch]:
            _delete_namespace(namespace)

    # --- running things on a host -------------------------------------------------------------
    def exec(self, namespace: str, command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", namespace, *command], **kwargs)  # type: ignore[arg-type]

    def run(self, host: str, command: Sequence[str], *, check: bool = True,
            timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return self.exec(self.hosts[host].namespace, command, check=check, timeout=timeout)

    def popen(self, host: str, command: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """A process on ``host``, killed when the topology closes."""
        process = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].namespace, *command],
                                   **kwargs)  # type: ignore[call-overload]
        self._processes.append(process)
        return process

    def address(self, host: str) -> str:
        return self.hosts[host].address

    @property
    def switch_namespace(self) -> str:
        """The namespace of the bridge: every frame between the hosts crosses it (captures look there)."""
        return self._switch

    # --- faults -------------------------------------------------------------------------------
    def block(self, a: str, b: str) -> None:
        """Drop every packet between ``a`` and ``b`` (both directions, at both ends); others unaffected."""
        for here, there in ((a, b), (b, a)):
            for rule in _block_rules(self.address(there)):
                self.run(here, ["iptables", "-A", *rule])
                self._check_rule(here, rule)

    def heal(self, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            for rule in _block_rules(self.address(there)):
                self.run(here, ["iptables", "-D", *rule])
                if self.run(here, ["iptables", "-C", *rule], check=False).returncode == 0:
                    raise TopologyError(f"rule still present on {here} after removal: {' '.join(rule)}")

    def _check_rule(self, host: str, rule: Sequence[str]) -> None:
        if self.run(host, ["iptables", "-C", *rule], check=False).returncode != 0:
            raise TopologyError(f"iptables rule did not take on {host}: {' '.join(rule)}")


def _block_rules(address: str) -> list[list[str]]:
    return [["INPUT", "-s", address, "-j", "DROP"], ["OUTPUT", "-d", address, "-j", "DROP"]]


def _delete_namespace(namespace: str) -> None:
    pids = run(["ip", "netns", "pids", namespace], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", namespace], check=False)


def remove_leftovers() -> None:
    """Namespaces of earlier runs whose process is gone (a killed test run leaves them behind)."""
    netns_dir = Path("/var/run/netns")
    if not netns_dir.is_dir():
        return
    for entry in netns_dir.iterdir():
        name = entry.name
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX):].split("x", 1)[0]
        if owner.isdigit() and not _alive_run(int(owner)):
            _delete_namespace(name)


def _alive_run(tag: int) -> bool:
    """Whether a live process could own this tag (a tag starts with its creator's pid modulo 100000)."""
    return any(pid.isdigit() and int(pid) % 100000 == tag for pid in os.listdir("/proc"))
