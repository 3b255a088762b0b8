"""Shared fixtures: the `quicmesh` command as a subprocess, and throwaway meshes on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

CLI_TIMEOUT = 30.0  # no single command of a test may take longer


def quicmesh_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: no inherited control socket or systemd socket."""
    env = {k: v for k, v in os.environ.items() if k not in ("QUICMESH_CONTROL_SOCKET", "NOTIFY_SOCKET")}
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
