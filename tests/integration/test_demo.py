"""`quicmesh demo` as a first-time user runs it: it must succeed, tidy up, and survive Ctrl-C."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import quicmesh_env


def workdir_of(output: str) -> Path:
    return Path(re.search(r"each its own process, in (\S+)", output).group(1))


def wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_demo(cli) -> None:
    started = time.monotonic()
    result = cli("demo", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    for expected in ("alpha: 2/2 peers connected after", "beta: 2/2 peers connected after",
                     "gamma: 2/2 peers connected after", "datagram 'hello beta, from alpha'",
                     "message 'order #1'", "all 100 arrived, each exactly once", "reply 'pong from",
                     "node gamma  mesh demo", "all 3 nodes exited cleanly (status 0)", "Demo OK"):
        assert expected in out
    assert not workdir_of(out).exists()
    assert time.monotonic() - started < 30


def test_demo_keep_leaves_the_nodes_running(cli) -> None:
    result = cli("demo", "--keep", "--nodes", "2", timeout=60)
    pids = [int(pid) for pid in re.search(r"kill ([\d ]+) &&", result.stdout).group(1).split()]
    workdir = workdir_of(result.stdout)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        socket = re.search(r"status --socket (\S+)", result.stdout).group(1)
        assert cli("status", "--check", "--socket", socket).returncode == 0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        assert wait_gone(pids)
        shutil.rmtree(workdir, ignore_errors=True)


def test_ctrl_c_stops_the_nodes_and_removes_the_files() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "quicmesh", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=quicmesh_env())
    output = ""
    deadline = time.monotonic() + 20
    while "(pid " not in output and time.monotonic() < deadline:
        if select.select([demo.stdout], [], [], 1)[0]:
            output += demo.stdout.readline()
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)]
    assert len(pids) == 3, output
    demo.send_signal(signal.SIGINT)
    rest, err = demo.communicate(timeout=10)
    assert demo.returncode == 130, output + rest + err
    assert "interrupted" in err and "Traceback" not in err
    assert wait_gone(pids)
    assert not workdir_of(output).exists()
