"""Build real meshes for tests: real CA and node certs (the PKI library), configs on free loopback ports."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from pki.bootstrap import bootstrap, parse_node_spec
from quicmesh.config import Config, load_config
from quicmesh.ops.demo import free_udp_ports
from quicmesh.runtime.node import Node


def make_mesh(
    directory: Path, names: list[str], *, mesh: str = "test", fast: bool = True, **bootstrap_options: object
) -> dict[str, Config]:
    """Bootstrap ``names`` on 127.0.0.1 into ``directory``; return each node's loaded config.

    ``fast`` shortens the timers (keepalive 0.2 s, dead after 1 s, backoff 0.05..0.5 s) so tests of
    detection and reconnection take a fraction of a second.
    """
    ports = free_udp_ports(len(names))
    specs = [parse_node_spec(f"{name}=127.0.0.1:{port}") for name, port in zip(names, ports)]
    bootstrap(directory, mesh, specs, **bootstrap_options)  # type: ignore[arg-type]
    configs = {}
    for name in names:
        config = load_config(directory / name / "node.toml")
        listen = dataclasses.replace(config.node.listen, host="127.0.0.1")
        config = dataclasses.replace(config, node=dataclasses.replace(config.node, listen=listen))
        if fast:
            config = with_timers(config, keepalive=0.2, dead_after=1.0, backoff_min=0.05, backoff_max=0.5)
        configs[name] = config
    return configs


async def wait_rejection(node: Node, needle: str, timeout: float = 5.0) -> str:
    """The first handshake rejection recorded by ``node`` whose reason contains ``needle``."""
    async with asyncio.timeout(timeout):
        while True:
            for _, _, reason in node.rejections:
                if needle in reason:
                    return reason
            await asyncio.sleep(0.02)


def with_timers(config: Config, **timers: float) -> Config:
    return dataclasses.replace(config, timers=dataclasses.replace(config.timers, **timers))


def with_limits(config: Config, **limits: int) -> Config:
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))


class TerminationWatch(QuicConnectionProtocol):
    """A plain aioquic client protocol that records how its connection ended (``terminated``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.terminated: asyncio.Future[ConnectionTerminated] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        super().quic_event_received(event)
