"""Shared fixtures: the `quicmesh` command as a subprocess, and throwaway meshes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from quicmesh.ops.control import fetch_status
from quicmesh.ops.demo import LocalNode, make_local_mesh, start_node, stop_nodes, wait_healthy

CLI_TIMEOUT = 30.0  # no single command of a test may take longer


def quicmesh_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: no inherited config, control socket or systemd socket."""
    inherited = ("QUICMESH_CONTROL_SOCKET", "QUICMESH_SOCKET", "QUICMESH_CONFIG", "NOTIFY_SOCKET")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(extra or {})
    return env


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `quicmesh ARGS...` (as ``python -m quicmesh``) to completion; text output captured."""

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quicmesh", *args], capture_output=True, text=True,
                              input=input, env=quicmesh_env(env), timeout=timeout)

    return run


def poll(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Call ``condition`` until it returns something true (returned), failing the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)
    return result


# --- local meshes -----------------------------------------------------------------------------------
@pytest.fixture
def local_mesh(tmp_path: Path) -> list[LocalNode]:
    """A bootstrapped 3-node mesh (alpha, beta, gamma, mesh "demo") in tmp_path/"mesh", each node
    listening on 127.0.0.1 at a free UDP port; nothing is started."""
    return make_local_mesh(tmp_path / "mesh")


@pytest.fixture
def mesh_dir(local_mesh: list[LocalNode]) -> Path:
    """The bootstrap output folder of ``local_mesh``: ca/, mesh.json, <node>/{node.toml,node.key,...}."""
    return local_mesh[0].config.parent.parent


class RunningMesh:
    """`quicmesh run` processes for nodes of a local mesh; everything still running is stopped at the end."""

    def __init__(self, nodes: list[LocalNode]) -> None:
        self.nodes = {node.name: node for node in nodes}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *names: str, args: tuple[str, ...] = ()) -> None:
        for name in names or self.nodes:
            self.processes[name] = start_node(self.nodes[name], *args)

    def wait_healthy(self, *names: str, timeout: float = 15.0) -> None:
        async def wait() -> None:
            deadline = time.monotonic() + timeout
            await asyncio.gather(*(wait_healthy(self.nodes[n], deadline, self.processes.get(n))
                                   for n in names or self.processes))

        asyncio.run(wait())

    def socket(self, name: str) -> str:
        return str(self.nodes[name].socket)

    def status(self, name: str) -> dict[str, Any]:
        """The node's status document, fetched in-process (cheap enough to poll)."""
        return asyncio.run(fetch_status(self.nodes[name].socket))

    def log(self, name: str) -> str:
        return self.nodes[name].log.read_text()

    def signal(self, name: str, signum: int) -> None:
        self.processes[name].send_signal(signum)

    def stop(self, *names: str, timeout: float = 5.0) -> list[int]:
        return stop_nodes([self.processes[n] for n in names or self.processes], timeout)


@pytest.fixture
def running_mesh(local_mesh: list[LocalNode]) -> Iterator[RunningMesh]:
    """``local_mesh`` with every node started and fully connected."""
    mesh = RunningMesh(local_mesh)
    try:
        mesh.start()
        mesh.wait_healthy()
        yield mesh
    finally:
        mesh.stop(timeout=2.0)


@pytest.fixture(scope="module")
def shared_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """A running, fully connected 3-node mesh shared by the tests of one module: they may send and
    listen, but must not stop, signal or reconfigure its nodes."""
    mesh = RunningMesh(make_local_mesh(tmp_path_factory.mktemp("mesh")))
    try:
        mesh.start()
        mesh.wait_healthy()
        yield mesh
    finally:
        mesh.stop(timeout=2.0)
