"""UDP service forwarding with real nodes, real UDP sockets and an unmodified UDP echo program (127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkit import make_mesh, settled, with_limits
from quicmesh import Node
from quicmesh.config import Address, Config, ForwardConfig, ServiceConfig
from quicmesh.forwarding.forwarder import Forwarder
from quicmesh.protocol import wire
from quicmesh.runtime.datagrams import DATAGRAM_PACKET_OVERHEAD
from quicmesh.transport.pmtud import DEFAULT_CAP
from udpproxy import UdpRelay

HERE = Path(__file__).resolve().parents[1]  # tests/, where the helper scripts live
ANY = Address("127.0.0.1", 0)


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """A UDP echo server as a separate, quicmesh-free process."""
    process = subprocess.Popen([sys.executable, str(HERE / "udp_echo.py")], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on "), line
        yield int(line.split()[-1])
    finally:
        process.kill()
        process.wait(5)


def forge(node: Node, peer: str, service_id: int, flow_id: int, payload: bytes) -> str | None:
    """A hand-made FORWARD datagram, sent through the node's feature seam (no Forwarder needed)."""
    return node.features.send_datagram(peer, wire.encode_forward_datagram(service_id, flow_id, payload), len(payload))


def with_forwarding(config: Config, services=(), forwards=()) -> Config:
    return dataclasses.replace(config, services=tuple(services), forwards=tuple(forwards))


class Client:
    """A UDP client program on the forwarding node: a plain socket sending to the forward's port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.target = target

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    async def recv(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), timeout)

    async def round_trip(self, data: bytes, timeout: float = 2.0) -> bytes:
        self.send(data)
        return await self.recv(timeout)

    async def nothing_comes_back(self, data: bytes, wait: float = 0.5) -> bool:
        self.send(data)
        try:
            await self.recv(wait)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


async def until(condition, timeout: float = 5.0, interval: float = 0.02):
    async with asyncio.timeout(timeout):
        while not (result := condition()):
            await asyncio.sleep(interval)
    return result


def forward_status(forwarder: Forwarder, index: int = 0) -> dict:
    return forwarder.status()["forwards"][index]


def service_status(forwarder: Forwarder, name: str) -> dict:
    return next(s for s in forwarder.status()["services"] if s["name"] == name)


@pytest.fixture
async def mesh(tmp_path: Path, echo_port: int):
    """alpha forwards to beta's "echo" (allowed) and "nosuch" (not exposed); gamma forwards to beta's
    "echo" but is not allowed; beta also exposes "private" to nobody."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta", "gamma"])
    echo = Address("127.0.0.1", echo_port)
    configs["beta"] = with_forwarding(configs["beta"], services=[
        ServiceConfig("echo", echo, ("alpha",)), ServiceConfig("private", echo, ())])
    configs["alpha"] = with_forwarding(configs["alpha"], forwards=[
        ForwardConfig(ANY, "beta", "echo"), ForwardConfig(ANY, "beta", "nosuch")])
    configs["gamma"] = with_forwarding(configs["gamma"], forwards=[ForwardConfig(ANY, "beta", "echo")])
    nodes = {name: Node(config) for name, config in configs.items()}
    forwarders = {name: Forwarder(node) for name, node in nodes.items()}
    try:
        for name in nodes:
            await forwarders[name].start()
            await nodes[name].start()
        for node in nodes.values():
            await node.wait_connected(timeout=10)
        await settled(nodes.values())  # the duplicate connections' tie-break is over: none closes under a test
        await until(lambda: forward_status(forwarders["alpha"])["state"] == "ready")
        yield nodes, forwarders
    finally:
        for name in nodes:
            await forwarders[name].stop()
            await nodes[name].stop()


async def first_reply(client: Client, data: bytes, tries: int = 3) -> tuple[bytes, int]:
    """The first datagram through a fresh forward, and how many times it was sent: forwarding is unreliable
    like UDP, so a busy machine may lose it while the path settles (e.g. on a connection closed as a
    duplicate); a few tries (bounded) tell a lost datagram from a broken route."""
    for sent in range(1, tries):
        with contextlib.suppress(TimeoutError):
            return await client.round_trip(data), sent
    return await client.round_trip(data), tries


async def test_round_trips_and_concurrent_clients_get_their_own_replies(mesh) -> None:
    nodes, forwarders = mesh
    alpha = forwarders["alpha"]
    clients = [Client(alpha.forward_address(0)) for _ in range(5)]
    try:
        reply, hellos = await first_reply(clients[0], b"hello")
        assert reply == b"hello"
        for round_ in range(20):
            for index, client in enumerate(clients):
                client.send(f"client {index} round {round_}".encode())
            for index, client in enumerate(clients):
                assert await client.recv() == f"client {index} round {round_}".encode()
        status = forward_status(alpha)
        assert status["flows_active"] == 5 and status["counters"]["flows_opened"] == 5
        # Every hello sent counts out; a lost one (or its lost reply) does not come back in.
        assert status["counters"]["datagrams_out"] == 100 + hellos
        assert 101 <= status["counters"]["datagrams_in"] <= 100 + hellos
        assert {flow["counters"]["datagrams_out"] for flow in status["flows"]} == {20 + hellos, 20}
        served = service_status(forwarders["beta"], "echo")
        assert served["flows_active"] == 5 and 101 <= served["counters"]["datagrams_in"] <= 100 + hellos
        assert {flow["peer"] for flow in served["flows"]} == {"alpha"}
    finally:
        for client in clients:
            client.close()


async def test_a_peer_not_allowed_gets_nothing_through(mesh) -> None:
    nodes, forwarders = mesh
    gamma = forwarders["gamma"]
    client = Client(gamma.forward_address(0))
    try:
        assert await client.nothing_comes_back(b"let me in")
        assert forward_status(gamma)["state"] == "not offered"
        assert forward_status(gamma)["counters"]["refused"] == 1
        # Even a hand-made FORWARD datagram with the service's id is dropped and counted by beta.
        echo_id = service_status(forwarders["beta"], "echo")["id"]
        private_id = service_status(forwarders["beta"], "private")["id"]
        assert forge(nodes["gamma"], "beta", echo_id, 7, b"forged") is None
        assert forge(nodes["alpha"], "beta", private_id, 7, b"forged") is None
        assert forge(nodes["alpha"], "beta", 999, 7, b"no such id") is None
        beta = forwarders["beta"]
        await until(lambda: service_status(beta, "echo")["counters"]["denied"] == 1
                    and service_status(beta, "private")["counters"]["denied"] == 1
                    and beta.status()["unknown_service"] == 1)
        assert service_status(beta, "echo")["flows_active"] == 0
        assert await client.nothing_comes_back(b"still no")
    finally:
        client.close()


async def test_an_unexposed_service_is_refused(mesh) -> None:
    nodes, forwarders = mesh
    alpha = forwarders["alpha"]
    client = Client(alpha.forward_address(1))
    try:
        assert forward_status(alpha, 1)["state"] == "not offered"
        assert await client.nothing_comes_back(b"anyone?")
        assert forward_status(alpha, 1)["counters"]["refused"] == 1
        assert forward_status(alpha, 1)["flows_active"] == 0
    finally:
        client.close()


async def test_oversize_datagrams_are_dropped_and_counted(mesh) -> None:
    nodes, forwarders = mesh
    alpha = forwarders["alpha"]
    assert alpha.payload_limit("beta") >= nodes["alpha"].max_datagram_payload - 4 == 1165
    # Path MTU discovery grows the limit from there once a packet went out full (loopback: to the cap).
    client = Client(alpha.forward_address(0))
    assert await client.round_trip(b"m" * 1165) == b"m" * 1165
    client.close()
    grown = DEFAULT_CAP - DATAGRAM_PACKET_OVERHEAD - 4
    beta = forwarders["beta"]
    for _ in range(200):  # bounded: 10 s; each direction searches on its own (the echo's reply comes back)
        if alpha.payload_limit("beta") == grown == beta.payload_limit("alpha"):
            break
        await asyncio.sleep(0.05)
    limit = alpha.payload_limit("beta")
    assert limit == grown == beta.payload_limit("alpha")
    client = Client(alpha.forward_address(0))
    try:
        assert await client.round_trip(b"m" * limit) == b"m" * limit
        assert await client.nothing_comes_back(b"x" * (limit + 1))
        assert await client.round_trip(b"after") == b"after"
        assert forward_status(alpha)["counters"]["oversize"] == 1
    finally:
        client.close()


async def test_flow_limit_per_peer(tmp_path: Path, echo_port: int) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["beta"] = with_forwarding(configs["beta"], services=[ServiceConfig("echo", Address("127.0.0.1", echo_port))])
    configs["alpha"] = with_limits(with_forwarding(configs["alpha"], forwards=[ForwardConfig(ANY, "beta", "echo")]),
                                   max_flows_per_peer=2)
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        fa, fb = Forwarder(alpha), Forwarder(beta)
        await fa.start()
        await fb.start()
        try:
            await alpha.wait_connected(timeout=10)
            await until(lambda: forward_status(fa)["state"] == "ready")
            clients = [Client(fa.forward_address()) for _ in range(3)]
            assert await clients[0].round_trip(b"1") == b"1"
            assert await clients[1].round_trip(b"2") == b"2"
            assert await clients[2].nothing_comes_back(b"3")
            assert forward_status(fa)["counters"]["flows_refused"] == 1
            for client in clients:
                client.close()
        finally:
            await fa.stop()
            await fb.stop()


async def test_idle_flows_expire_and_their_sockets_close(tmp_path: Path, echo_port: int) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["beta"] = with_limits(
        with_forwarding(configs["beta"], services=[ServiceConfig("echo", Address("127.0.0.1", echo_port))]),
        forward_idle_timeout=0.4)
    configs["alpha"] = with_limits(with_forwarding(configs["alpha"], forwards=[ForwardConfig(ANY, "beta", "echo")]),
                                   forward_idle_timeout=0.4)
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        fa, fb = Forwarder(alpha), Forwarder(beta)
        await fa.start()
        await fb.start()
        try:
            await alpha.wait_connected(timeout=10)
            await until(lambda: forward_status(fa)["state"] == "ready")
            clients = [Client(fa.forward_address()) for _ in range(3)]
            for index, client in enumerate(clients):
                assert await client.round_trip(bytes([index])) == bytes([index])
            assert fb.open_sockets() == 3 + 0  # one per service flow; beta has no forwards
            sockets = [flow_socket for service in fb._services.values() for flow_socket in
                       (f.sock for f in service.flows.values())]
            await until(lambda: fb.open_sockets() == 0 and forward_status(fa)["flows_active"] == 0, timeout=5)
            assert all(sock.fileno() == -1 for sock in sockets)  # closed, not just forgotten
            assert service_status(fb, "echo")["counters"]["flows_expired"] == 3
            assert forward_status(fa)["counters"]["flows_expired"] == 3
            assert await clients[0].round_trip(b"again") == b"again"  # a new flow
            assert forward_status(fa)["counters"]["flows_opened"] == 4
            for client in clients:
                client.close()
        finally:
            await fa.stop()
            await fb.stop()
        assert fa.open_sockets() == fb.open_sockets() == 0


async def test_flows_resume_after_the_path_is_cut_and_restored(tmp_path: Path, echo_port: int) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    relay = UdpRelay(("127.0.0.1", configs["beta"].node.listen.port))
    relay_port = await relay.start()
    beta_peer = dataclasses.replace(configs["alpha"].peer("beta"), address=Address("127.0.0.1", relay_port))
    configs["alpha"] = with_forwarding(dataclasses.replace(configs["alpha"], peers=(beta_peer,)),
                                       forwards=[ForwardConfig(ANY, "beta", "echo")])
    configs["beta"] = with_forwarding(configs["beta"], services=[ServiceConfig("echo", Address("127.0.0.1", echo_port))])
    # beta must not dial alpha directly, or the cut would not cut: beta only accepts.
    configs["beta"] = dataclasses.replace(configs["beta"], peers=tuple(
        dataclasses.replace(p, address=Address("127.0.0.1", 9)) for p in configs["beta"].peers))
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        fa, fb = Forwarder(alpha), Forwarder(beta)
        await fa.start()
        await fb.start()
        clients = [Client(fa.forward_address()) for _ in range(3)]
        try:
            await alpha.wait_connected(timeout=10)
            await until(lambda: forward_status(fa)["state"] == "ready")
            for index, client in enumerate(clients):
                assert await client.round_trip(b"before %d" % index) == b"before %d" % index
            flows_before = {f["source"]: f["flow_id"] for f in forward_status(fa)["flows"]}
            relay.cut = True
            await until(lambda: "beta" not in alpha.connected_peers(), timeout=10)
            assert await clients[0].nothing_comes_back(b"while cut", wait=0.2)
            assert forward_status(fa)["counters"]["unavailable"] >= 1
            relay.cut = False
            await alpha.wait_connected(timeout=15)
            await until(lambda: forward_status(fa)["state"] == "ready")
            for index, client in enumerate(clients):
                assert await client.round_trip(b"after %d" % index) == b"after %d" % index
            assert {f["source"]: f["flow_id"] for f in forward_status(fa)["flows"]} == flows_before  # same flows
            assert service_status(fb, "echo")["counters"]["flows_opened"] == 3  # beta's sockets resumed too
            assert fb.open_sockets() == 3
        finally:
            for client in clients:
                client.close()
            await fa.stop()
            await fb.stop()
            relay.close()
        assert fa.open_sockets() == fb.open_sockets() == 0


async def test_reload_adds_and_removes_services_and_forwards(tmp_path: Path, echo_port: int) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    echo = Address("127.0.0.1", echo_port)
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        fa, fb = Forwarder(alpha), Forwarder(beta)
        await fa.start()
        await fb.start()
        try:
            await alpha.wait_connected(timeout=10)
            assert fa.status()["forwards"] == [] and fb.status()["services"] == []
            new_beta = with_forwarding(configs["beta"], services=[ServiceConfig("echo", echo)])
            await beta.reload(new_beta)
            assert await fb.apply(new_beta) == []
            new_alpha = with_forwarding(configs["alpha"], forwards=[ForwardConfig(ANY, "beta", "echo")])
            await alpha.reload(new_alpha)
            assert await fa.apply(new_alpha) == []
            await until(lambda: forward_status(fa)["state"] == "ready")
            client = Client(fa.forward_address())
            assert await client.round_trip(b"reloaded") == b"reloaded"
            await beta.reload(configs["beta"])
            await fb.apply(configs["beta"])  # the service goes: its flows and sockets too
            assert fb.open_sockets() == 0
            await until(lambda: forward_status(fa)["state"] == "not offered")
            assert await client.nothing_comes_back(b"gone")
            await alpha.reload(configs["alpha"])
            await fa.apply(configs["alpha"])
            assert fa.status()["forwards"] == [] and fa.open_sockets() == 0
            client.close()
        finally:
            await fa.stop()
            await fb.stop()


async def test_a_restarted_forwarding_peer_gets_fresh_flows(tmp_path: Path, echo_port: int) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["beta"] = with_forwarding(configs["beta"], services=[ServiceConfig("echo", Address("127.0.0.1", echo_port))])
    configs["alpha"] = with_forwarding(configs["alpha"], forwards=[ForwardConfig(ANY, "beta", "echo")])
    async with Node(configs["beta"]) as beta:
        fb = Forwarder(beta)
        await fb.start()
        try:
            for generation in range(2):  # alpha's process restarts: a new epoch, flow ids from 0 again
                async with Node(configs["alpha"]) as alpha:
                    fa = Forwarder(alpha)
                    await fa.start()
                    try:
                        await alpha.wait_connected(timeout=10)
                        await until(lambda: forward_status(fa)["state"] == "ready")
                        client = Client(fa.forward_address())
                        assert await client.round_trip(b"gen %d" % generation) == b"gen %d" % generation
                        client.close()
                        await until(lambda: service_status(fb, "echo")["flows_active"] == 1)
                    finally:
                        await fa.stop()
            assert service_status(fb, "echo")["counters"]["flows_opened"] == 2  # the old flow was not reused
            assert fb.open_sockets() == 1
        finally:
            await fb.stop()
        assert fb.open_sockets() == 0


async def test_the_exposing_side_limits_flows_per_peer_too(tmp_path: Path, echo_port: int) -> None:
    """A hostile or buggy peer naming ever new flow ids cannot make beta open more sockets than the limit."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["beta"] = with_limits(
        with_forwarding(configs["beta"], services=[ServiceConfig("echo", Address("127.0.0.1", echo_port))]),
        max_flows_per_peer=2)
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        fb = Forwarder(beta)
        await fb.start()
        try:
            await alpha.wait_connected(timeout=10)
            await beta.wait_connected(timeout=10)
            echo_id = service_status(fb, "echo")["id"]

            def first_flow_open() -> bool:  # until the connection has settled (a duplicate may be closing)
                forge(alpha, "beta", echo_id, 0, b"x")
                return service_status(fb, "echo")["flows_active"] == 1

            await until(first_flow_open, interval=0.1)
            for flow_id in range(1, 5):
                assert forge(alpha, "beta", echo_id, flow_id, b"x") is None
            await until(lambda: service_status(fb, "echo")["counters"]["flows_refused"] == 3)
            assert fb.open_sockets() == 2 and service_status(fb, "echo")["counters"]["flows_opened"] == 2
        finally:
            await fb.stop()
