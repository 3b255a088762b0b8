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

NAT (issue 18): ``Topology(["r", "a", "b"], nat={"a": EIM, "b": SYMMETRIC})`` puts a and b each on a private
network of their own behind a router namespace whose bridge address is their public one (``public_address``),
with iptables MASQUERADE: ``EIM`` keeps the source port (Linux preserves it when it is free: the same public
port for every destination, endpoint-independent mapping), ``SYMMETRIC`` draws a random port per destination
(``--random-fully``). Either router drops unsolicited packets from outside (address- and port-dependent
filtering, as home routers do), so only replies to what the host sent get in. ``rebind`` moves a router to a
new public address, which ends every mapping (the kernel drops MASQUERADE's entries of a removed address).
``ipv6=True`` gives every bridge host an IPv6 address too (``address6``); ``remove_family`` makes one single-stack.

Needs root, ``ip`` (iproute2), ``iptables`` and ``ip6tables``; ``.ci/test`` installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_NETNS_ETC = Path("/etc/netns")  # per-namespace files that `ip netns exec` mounts over /etc
PREFIX = "qmt"  # every namespace and link this harness makes starts with it
#: Each topology has a bridge of its own in a namespace of its own, so every one can use the same subnet; the
#: machine's own namespace never sees it.
_SUBNET = "10.231.0"
_SUBNET6 = "fd00:231::"
EIM, SYMMETRIC = "eim", "symmetric"  # the NAT mappings a router can have
_MASQUERADE = {EIM: ["MASQUERADE"], SYMMETRIC: ["MASQUERADE", "--random-fully"]}


class TopologyError(RuntimeError):
    """A namespace, link or rule could not be set up (the message says which command and why)."""


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root; run as root, as CI does"
    for tool in ("ip", "iptables", "ip6tables"):
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
    address: str  # on the bridge; behind a NAT, on the host's private network
    address6: str | None = None  # on the bridge, with ipv6=True
    nat: str | None = None  # EIM or SYMMETRIC: behind a router namespace of its own

    @property
    def router(self) -> str:
        return f"{self.namespace}-nat"


class Topology:
    """Hosts on one bridge; removed on exit (processes killed, namespaces deleted), even when a test fails."""

    _made = 0  # topologies made by this process: part of each one's names

    def __init__(self, hosts: Sequence[str], *, nat: Mapping[str, str] | None = None, ipv6: bool = False) -> None:
        if not hosts or len(hosts) > 100 or len(set(hosts)) != len(hosts):
            raise ValueError("hosts: 1 to 100 distinct names")
        nat = dict(nat or {})
        if set(nat) - set(hosts) or set(nat.values()) - set(_MASQUERADE):
            raise ValueError(f"nat: host names of this topology -> {EIM!r} or {SYMMETRIC!r}, got {nat!r}")
        Topology._made += 1
        self.tag = f"{os.getpid() % 100000}x{Topology._made}"
        self._switch = f"{PREFIX}{self.tag}-sw"
        self.hosts = {
            name: Host(name, f"{PREFIX}{self.tag}-{name}",
                       f"192.168.{index + 1}.2" if name in nat else f"{_SUBNET}.{index + 1}",
                       f"{_SUBNET6}{index + 1}" if ipv6 and name not in nat else None, nat.get(name))
            for index, name in enumerate(hosts)}
        #: each host's address as the bridge sees it: its own, or its router's (``rebind`` changes it)
        self._public = {name: f"{_SUBNET}.{index + 1}" for index, name in enumerate(hosts)}
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
            run(["ip", "netns", "add", host.namespace])
            self.exec(host.namespace, ["ip", "link", "set", "lo", "up"])
            on_bridge = host.router if host.nat else host.namespace
            if host.nat:
                run(["ip", "netns", "add", host.router])
            outer, inner = f"{PREFIX}{self.tag}s{index}"[:15], f"{PREFIX}{self.tag}h{index}"[:15]
            run(["ip", "link", "add", inner, "netns", on_bridge, "type", "veth", "peer", "name", outer,
                 "netns", self._switch])
            self.exec(self._switch, ["ip", "link", "set", outer, "master", "br0", "up"])
            self.exec(on_bridge, ["ip", "link", "set", inner, "name", "eth0"])
            self.exec(on_bridge, ["ip", "addr", "add", f"{self._public[host.name]}/24", "dev", "eth0"])
            if host.address6:
                self.exec(on_bridge, ["ip", "addr", "add", f"{host.address6}/64", "dev", "eth0", "nodad"])
            self.exec(on_bridge, ["ip", "link", "set", "eth0", "up"])
            if host.nat:
                self._build_router(host, index)

    def _build_router(self, host: Host, index: int) -> None:
        """A private network router -- host, and the router's MASQUERADE and filter rules (each checked)."""
        router, lan = host.router, f"192.168.{index + 1}.1"
        inner, outer = f"{PREFIX}{self.tag}l{index}"[:15], f"{PREFIX}{self.tag}p{index}"[:15]
        self.exec(router, ["ip", "link", "set", "lo", "up"])
        run(["ip", "link", "add", inner, "netns", host.namespace, "type", "veth", "peer", "name", outer,
             "netns", router])
        self.exec(host.namespace, ["ip", "link", "set", inner, "name", "eth0"])
        self.exec(host.namespace, ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"])
        self.exec(host.namespace, ["ip", "link", "set", "eth0", "up"])
        self.exec(host.namespace, ["ip", "route", "add", "default", "via", lan])
        self.exec(router, ["ip", "link", "set", outer, "name", "lan0"])
        self.exec(router, ["ip", "addr", "add", f"{lan}/24", "dev", "lan0"])
        self.exec(router, ["ip", "link", "set", "lan0", "up"])
        self.exec(router, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        assert host.nat is not None
        rules = [
            ["-t", "nat", "POSTROUTING", "-o", "eth0", "-j", *_MASQUERADE[host.nat]],
            # Unsolicited packets from outside are dropped before conntrack confirms an entry for them: one
            # that reached the router's own UDP stack would hold the public port the host's mapping needs.
            ["INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"],
            ["FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"],
        ]
        for rule in rules:
            table, chain = (rule[:2], rule[2:]) if rule[0] == "-t" else ([], rule)
            self.exec(router, ["iptables", *table, "-A", *chain])
            if self.exec(router, ["iptables", *table, "-C", *chain], check=False).returncode != 0:
                raise TopologyError(f"iptables rule did not take on {host.name}'s router: {' '.join(rule)}")

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        for process in self._processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        routers = [host.router for host in self.hosts.values() if host.nat]
        for namespace in [*(host.namespace for host in self.hosts.values()), *routers, self._switch]:
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

    def public_address(self, host: str) -> str:
        """Where the bridge sees ``host``: its own address, or its NAT router's."""
        return self._public[host]

    def hosts_file(self, host: str, entries: Mapping[str, Sequence[str]]) -> None:
        """Name -> addresses for processes started on ``host`` from now on (``ip netns exec`` bind-mounts
        /etc/netns/NAMESPACE/hosts over /etc/hosts); removed with the topology."""
        folder = _NETNS_ETC / self.hosts[host].namespace
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{address} {name}" for name, addresses in entries.items() for address in addresses]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def rebind(self, host: str) -> str:
        """Give ``host``'s NAT router a new public address: every mapping it had ends (the kernel drops the
        MASQUERADE conntrack entries of a removed address), so the host's next packets leave from a new
        address and port, as after a NAT reboot or a move to another network. Returns the new address."""
        router = self.hosts[host].router
        old = self._public[host]
        new = f"{_SUBNET}.{int(old.rsplit('.', 1)[1]) + 100}"
        self.exec(router, ["ip", "addr", "del", f"{old}/24", "dev", "eth0"])  # first: a primary address's
        self.exec(router, ["ip", "addr", "add", f"{new}/24", "dev", "eth0"])  # removal takes its secondaries
        self._public[host] = new
        return new

    def remove_family(self, host: str, family: int) -> None:
        """Take ``host``'s IPv4 (4) or IPv6 (6) address away: it is left single-stack."""
        entry = self.hosts[host]
        address = f"{entry.address}/24" if family == 4 else f"{entry.address6}/64"
        self.run(host, ["ip", "addr", "del", address, "dev", "eth0"])

    def blackhole(self, host: str, family: int) -> None:
        """Silently drop every UDP packet of one IP version (4 or 6) arriving at ``host``."""
        tool = {4: "iptables", 6: "ip6tables"}[family]
        rule = ["INPUT", "-p", "udp", "-j", "DROP"]
        self.run(host, [tool, "-A", *rule])
        if self.run(host, [tool, "-C", *rule], check=False).returncode != 0:
            raise TopologyError(f"{tool} rule did not take on {host}: {' '.join(rule)}")

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
    shutil.rmtree(_NETNS_ETC / namespace, ignore_errors=True)
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
