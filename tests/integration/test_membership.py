"""Open membership on real `quicmesh run` processes (issue 16, docs/MEMBERSHIP.md).

Eight daemons on their own 127.0.0.x addresses, each made by join-bundle with the first one as its only
seed and no [[peers]], form a full mesh; the module's tests then share it: a 9th node joins from a
`quicmesh-pki join-bundle` folder and leaves, a member restarts on a new address, forged and replayed
announcements are sent to a member by an in-process node holding a real certificate, one member is
revoked through one `quicmesh crl push`, and one is killed. Timers are short ([mesh] announce_interval 1 s,
member_timeout 3 s, through a conf.d drop-in); every wait is bounded and every timing is printed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningMesh
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pki_helpers import run_pki

from pki.authority import CertificateAuthority, create_root_ca
from pki.join import join_bundle
from quicmesh.config import Timers, load_config
from quicmesh.membership.announcement import sign_announcement
from quicmesh.membership.messages import Announce, encode_message
from quicmesh.ops.control import ControlClient, ControlError
from quicmesh.ops.demo import NAMES, LocalNode, free_udp_ports
from quicmesh.protocol import wire
from quicmesh.protocol.identity import load_certificates
from quicmesh.runtime.node import Node

CliRun = Callable[..., subprocess.CompletedProcess[str]]

MESH = "members"
SEED = NAMES[0]  # alpha: the only address the others know
ANNOUNCE_INTERVAL = 1.0
MEMBER_TIMEOUT = 3.0
TEST_TIMERS = f"[mesh]\nannounce_interval = {ANNOUNCE_INTERVAL}\nmember_timeout = {MEMBER_TIMEOUT}\n"
WITHIN = 5.0  # the bound for joining, leaving, reconnecting after a restart and revocation
FORM_TIMEOUT = 30.0  # 8 processes starting at once on 2 shared cores
_HOSTS = itertools.count(101)  # 127.0.0.101, .102, ...: one loopback address per node process


@dataclass
class OpenMesh:
    """The running mesh of this module, where its files are, and who has left it for good."""

    directory: Path
    ca: CertificateAuthority
    running: RunningMesh
    addresses: dict[str, str] = field(default_factory=dict)  # node -> "host:port" it listens on
    out: set[str] = field(default_factory=set)  # revoked, killed: not expected to be connected

    @property
    def ca_dir(self) -> Path:
        return self.directory / "ca"

    def add_node(self, name: str, seed: str | None = None) -> LocalNode:
        """A join-bundle folder for ``name`` (library call: the CLI is tested by the 9th node), short timers."""
        address = fresh_address()
        join_bundle(self.ca, name, self.directory / name, seeds=[seed or address], listen=address)
        return self.adopt(name, address)

    def adopt(self, name: str, address: str) -> LocalNode:
        folder = self.directory / name
        (folder / "conf.d").mkdir()
        (folder / "conf.d" / "50-test-timers.toml").write_text(TEST_TIMERS)  # node.toml stays as written
        node = LocalNode(name, folder / "node.toml", folder / "quicmesh.sock", int(address.rsplit(":", 1)[1]))
        self.running.nodes[name] = node
        self.addresses[name] = address
        return node

    def alive(self, *, besides: str = "") -> list[str]:
        """The original members still in the mesh (running, not revoked or killed), but ``besides``."""
        return [name for name in NAMES if name not in self.out and name != besides
                and self.running.processes[name].poll() is None]

    def documents(self, names: list[str]) -> dict[str, dict[str, Any] | None]:
        return dict(zip(names, asyncio.run(_documents([self.running.nodes[n].socket for n in names])), strict=True))

    def document(self, name: str) -> dict[str, Any] | None:
        return self.documents([name])[name]

    def watch(self, names: list[str], holds: Callable[[dict[str, Any]], bool], timeout: float,
              what: str) -> dict[str, float]:
        """Poll the members documents of ``names`` until ``holds`` is true of each; time.monotonic() at which
        it first held on each. Fails the test after ``timeout`` naming the nodes where it never did."""
        first: dict[str, float] = {}
        documents: dict[str, dict[str, Any] | None] = {}
        deadline = time.monotonic() + timeout
        while True:
            pending = [name for name in names if name not in first]
            documents = self.documents(pending)
            now = time.monotonic()
            first.update({name: now for name, document in documents.items() if document and holds(document)})
            if len(first) == len(names):
                return first
            if now > deadline:
                late = {name: _summary(documents.get(name)) for name in names if name not in first}
                pytest.fail(f"{what}: not within {timeout:g} s on {late}")
            time.sleep(0.1)


async def _documents(sockets: list[Path]) -> list[dict[str, Any] | None]:
    """The `quicmesh members` document of each node (None where the daemon does not answer)."""
    async def one(path: Path) -> dict[str, Any] | None:
        try:
            async with await ControlClient.connect(path) as client:
                return (await asyncio.wait_for(client.call("members"), 5.0))["members"]
        except (ControlError, OSError, TimeoutError):
            return None

    return list(await asyncio.gather(*(one(path) for path in sockets)))


def fresh_address() -> str:
    host = f"127.0.0.{next(_HOSTS)}"
    (port,) = free_udp_ports(1, host)
    return f"{host}:{port}"


def member(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in document["members"] if m["name"] == name), None)


def connected(document: dict[str, Any]) -> set[str]:
    return {m["name"] for m in document["members"] if m["connected"]}


def gone(document: dict[str, Any], name: str, reason: str) -> bool:
    found = member(document, name)
    return found is not None and found["state"] == "gone" and found["gone_reason"].startswith(reason) \
        and not found["connected"]


def _summary(document: dict[str, Any] | None) -> str:
    if document is None:
        return "no answer"
    return ", ".join(f"{m['name']} {m['state']}{'+' if m['connected'] else ''}" for m in document["members"])


def spread(first: dict[str, float], since: float) -> str:
    return f"{min(first.values()) - since:.2f}-{max(first.values()) - since:.2f} s"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenMesh]:
    """Eight daemons that know only the seed; returned once every one is connected to the seven others."""
    directory = tmp_path_factory.mktemp("membership")
    create_root_ca(directory / "ca", MESH)
    mesh = OpenMesh(directory, CertificateAuthority.open(directory / "ca"), RunningMesh([]))
    seed = mesh.add_node(SEED)
    for name in NAMES[1:]:
        mesh.add_node(name, seed=mesh.addresses[seed.name])
    try:
        started = time.monotonic()
        mesh.running.start(*NAMES)
        formed = mesh.watch(list(NAMES), lambda d: len(connected(d)) == len(NAMES) - 1, FORM_TIMEOUT,
                            "8 nodes knowing one seed form a full mesh")
        print(f"\nmeasured: 8 processes knowing one seed: full mesh {max(formed.values()) - started:.2f} s "
              "after starting them")
        yield mesh
    finally:
        mesh.running.stop(timeout=3.0)


def test_eight_nodes_knowing_one_seed_form_a_full_mesh(mesh: OpenMesh, cli: CliRun) -> None:
    for name in ("beta", "theta"):
        shown = cli("members", "--json", "--socket", mesh.running.socket(name))
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert document["open"] and document["mode"] == "full"
        assert document["seeds"] == [mesh.addresses[SEED]]
        assert connected(document) == set(NAMES) - {name}
        for other in set(NAMES) - {name}:  # every member as it announced itself: the address it listens on
            found = member(document, other)
            assert found["state"] == "alive" and found["addresses"] == [mesh.addresses[other]], found
        assert document["counters"]["rejected"] == {}
        status = cli("status", "--json", "--socket", mesh.running.socket(name))
        assert status.returncode == 0, status.stderr
        peers = json.loads(status.stdout)["peers"]
        assert {p["name"] for p in peers if p["state"] == "connected"} == set(NAMES) - {name}
    assert not (mesh.directory / "alpha" / "node.toml").read_text().count("[[peers]]")


def test_forged_tampered_replayed_and_revoked_announcements_are_refused(mesh: OpenMesh, cli: CliRun) -> None:
    """An in-process member with a real certificate sends crafted MEMBERSHIP messages to alpha."""
    target, victim = SEED, "beta"
    probe = mesh.add_node("probe", seed=mesh.addresses[target])
    ghost = mesh.directory / "ghost"  # a certificate of the mesh, revoked before it is ever used
    join_bundle(mesh.ca, "ghost", ghost, seeds=[mesh.addresses[target]], listen=fresh_address())
    assert run_pki("revoke", "ghost", "--ca-dir", mesh.ca_dir).returncode == 0
    pushed = cli("crl", "push", str(mesh.ca_dir / "crl.pem"), "--socket", mesh.running.socket(target))
    assert pushed.returncode == 0, pushed.stderr

    def signed(folder: Path, *, node: str, version: int, address: str) -> bytes:
        return sign_announcement(
            mesh=MESH, node=node, version=version, epoch=1, issued_at=int(time.time()), addresses=(address,),
            services=(), relay=True, leaving=False, chain=load_certificates(folder / "node.crt"),
            key=load_pem_private_key((folder / "node.key").read_bytes(), None)).raw

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], int]:
        node = Node(load_config(probe.config))
        await node.start()
        try:
            async with asyncio.timeout(10):
                while target not in node.connected_peers():
                    await asyncio.sleep(0.05)
            before = (await _documents([mesh.running.nodes[target].socket]))[0]
            known = member(before, victim)["version"]
            future = time.time_ns() // 1000 + 60_000_000  # news for a minute to come, if it were believed
            genuine = signed(mesh.directory / victim, node=victim, version=future, address=mesh.addresses[victim])
            port = mesh.addresses[victim].rsplit(":", 1)[1].encode()
            tampered = genuine.replace(port, bytes([port[0] ^ 1]) + port[1:], 1)  # one byte of the port flipped
            assert tampered != genuine and len(tampered) == len(genuine)
            crafted = [
                tampered,
                signed(mesh.directory / "probe", node=victim, version=future, address="127.0.0.99:9"),  # its name
                signed(mesh.directory / victim, node=victim, version=known - 1, address="127.0.0.99:9"),  # old
                signed(mesh.directory / victim, node=victim, version=known - 1, address="127.0.0.99:9"),
                signed(ghost, node="ghost", version=future, address="127.0.0.99:9"),  # revoked
                b"\x01not an announcement",
            ]
            for raw in crafted:  # each acknowledged: refusing an announcement is not refusing the message
                await node.features.send_message(target, wire.FeatureTag.MEMBERSHIP, encode_message(Announce((raw,))))
            after = (await _documents([mesh.running.nodes[target].socket]))[0]
            return before, after, future
        finally:
            await node.stop()

    before, after, future = asyncio.run(scenario())
    assert mesh.running.processes[target].poll() is None and after is not None
    rejected = {reason: count - before["counters"]["rejected"].get(reason, 0)
                for reason, count in after["counters"]["rejected"].items()}
    print(f"\nmeasured: rejected at {target} by reason {rejected}; replays counted "
          f"{after['counters']['replayed'] - before['counters']['replayed']} (gossip duplicates included)")
    assert rejected.get("AnnouncementError", 0) >= 1  # the flipped byte: the signature does not verify
    assert rejected.get("IdentityMismatchError") == 1  # probe's certificate does not prove beta's name
    assert rejected.get("RevokedError") == 1
    assert rejected.get("malformed") == 1
    assert after["counters"]["replayed"] - before["counters"]["replayed"] >= 2
    assert {(m["name"], m["state"]) for m in after["members"]} == {(m["name"], m["state"]) for m in before["members"]}
    beta = member(after, victim)
    assert beta["addresses"] == [mesh.addresses[victim]] and beta["connected"]
    assert member(before, victim)["version"] <= beta["version"] < future
    assert member(after, "ghost") is None


def test_a_join_bundle_node_joins_within_5s_and_its_leaving_is_seen_within_5s(mesh: OpenMesh) -> None:
    address = fresh_address()
    made = run_pki("join-bundle", "iota", "--ca-dir", mesh.ca_dir, "--seed", mesh.addresses[SEED],
                   "--listen", address, "--out", mesh.directory / "iota")
    assert made.returncode == 0, made.stderr
    mesh.adopt("iota", address)
    members = mesh.alive()
    started = time.monotonic()
    mesh.running.start("iota")
    ready = mesh.watch(["iota"], lambda d: True, 15.0, "iota's control socket answers")["iota"]
    joined = mesh.watch(members, lambda d: "iota" in connected(d), WITHIN, "members connected to iota")
    mesh.watch(["iota"], lambda d: connected(d) == set(members), WITHIN, "iota connected to all")
    print(f"\nmeasured: iota connected to all {len(members)} members {max(joined.values()) - ready:.2f} s after its "
          f"daemon answered ({max(joined.values()) - started:.2f} s after the process started)")
    assert max(joined.values()) - ready <= WITHIN

    mesh.running.signal("iota", signal.SIGTERM)
    left = time.monotonic()
    dropped = mesh.watch(members, lambda d: gone(d, "iota", "left"), WITHIN, "iota gone (left)")
    print(f"measured: iota's graceful stop seen as gone (left) by all {len(members)} in {spread(dropped, left)}")
    assert mesh.running.processes["iota"].wait(5) == 0


@pytest.mark.parametrize(("moved", "stop"), [("theta", signal.SIGTERM), ("delta", signal.SIGKILL)],
                         ids=["stopped", "killed"])
def test_a_member_restarted_on_a_new_address_is_reconnected_within_5s(mesh: OpenMesh, moved: str,
                                                                      stop: signal.Signals) -> None:
    """Stopped: the others saw it leave. Killed: they still hold its old connection and old address."""
    others = mesh.alive(besides=moved)
    mesh.running.signal(moved, stop)
    assert mesh.running.processes[moved].wait(5) == (0 if stop == signal.SIGTERM else -stop)
    if stop == signal.SIGTERM:
        mesh.watch(others, lambda d: gone(d, moved, "left"), WITHIN, f"{moved} gone (left)")
    config = mesh.running.nodes[moved].config
    old, new = mesh.addresses[moved], fresh_address()
    config.write_text(config.read_text().replace(f'listen = "{old}"', f'listen = "{new}"'))
    assert f'listen = "{new}"' in config.read_text()
    mesh.addresses[moved] = new

    mesh.running.start(moved)
    ready = mesh.watch([moved], lambda d: True, 15.0, f"{moved}'s control socket answers")[moved]

    def reconnected(document: dict[str, Any]) -> bool:
        found = member(document, moved)
        return found is not None and found["connected"] and found["addresses"] == [new]

    back = mesh.watch(others, reconnected, WITHIN, f"members reconnected to {moved} at {new}")
    # Its new process connected to every member: each of them holds a connection to the new process.
    whole = mesh.watch([moved], lambda d: connected(d) == set(others), WITHIN, f"{moved} connected to all")[moved]
    print(f"\nmeasured: {moved} {stop.name}, restarted on {new} (was {old}): all {len(others)} members connected "
          f"to it {max(*back.values(), whole) - ready:.2f} s after its daemon answered")


def test_one_pushed_crl_evicts_the_revoked_member_everywhere_within_5s(mesh: OpenMesh, cli: CliRun) -> None:
    revoked, entry = "zeta", "beta"  # the CRL is handed to beta only
    others = mesh.alive(besides=revoked)
    assert run_pki("revoke", revoked, "--ca-dir", mesh.ca_dir).returncode == 0
    logs = {name: len(mesh.running.log(name)) for name in others}
    pushed_at = time.monotonic()
    pushed = cli("crl", "push", str(mesh.ca_dir / "crl.pem"), "--socket", mesh.running.socket(entry))
    assert pushed.returncode == 0, pushed.stderr
    mesh.out.add(revoked)
    evicted = mesh.watch(others, lambda d: gone(d, revoked, "revoked"), WITHIN, f"{revoked} gone (revoked)")
    print(f"\nmeasured: one crl push to {entry}: {revoked} evicted by all {len(others)} members in "
          f"{spread(evicted, pushed_at)} (the push command's own start-up included)")
    numbers = {d["crl_number"] for d in mesh.documents(others).values() if d}
    assert len(numbers) == 1 and None not in numbers

    # Refused afterwards: zeta (still running) keeps dialing its members and its seed; each handshake fails.
    address = mesh.addresses[revoked]

    def refused() -> list[str]:
        return [name for name in others if any(
            "event=handshake_rejected" in line and f"address={address}" in line and "revoked" in line
            for line in mesh.running.log(name)[logs[name]:].splitlines())]

    deadline = time.monotonic() + WITHIN
    while not refused():
        assert time.monotonic() < deadline, f"no member logged a refused handshake from {revoked} at {address}"
        time.sleep(0.2)
    print(f"measured: {revoked}'s handshakes refused afterwards by {refused()}")
    assert mesh.running.processes[revoked].poll() is None
    assert connected(mesh.document(revoked)) == set()
    assert all(not member(d, revoked)["connected"] for d in mesh.documents(others).values() if d)


def test_a_killed_member_is_marked_gone_after_member_timeout(mesh: OpenMesh) -> None:
    killed = "eta"
    others = mesh.alive(besides=killed)
    mesh.running.signal(killed, signal.SIGKILL)
    at = time.monotonic()
    mesh.out.add(killed)
    bound = Timers().dead_after + MEMBER_TIMEOUT + 3.0  # the connection noticed dead, then the silence
    lost = mesh.watch(others, lambda d: killed not in connected(d), bound, f"connection to {killed} lost")
    silent = mesh.watch(others, lambda d: gone(d, killed, "silent"), bound, f"{killed} gone (silent)")
    print(f"\nmeasured: {killed} SIGKILLed: connections lost after {spread(lost, at)}, "
          f"marked gone (silent for {MEMBER_TIMEOUT:g}s) after {spread(silent, at)}")
    assert min(silent.values()) - at >= MEMBER_TIMEOUT - 0.2  # not before member_timeout has passed
    for name in others:  # gone means not connected for member_timeout: never before the connection went
        assert silent[name] - lost[name] >= MEMBER_TIMEOUT - 0.5, (name, silent[name] - lost[name])
