"""deploy/compose.yaml for real, with podman-compose: pki-init makes the PKI, three hardened nodes form
a mesh, and the tester node proves it end to end (its exit status is the verdict)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from containers import cluster as harness

pytestmark = pytest.mark.containers

COMPOSE_FILE = harness.REPO / "deploy" / "compose.yaml"
PREFIX = "qmcompose"
PROJECT_LABEL = "io.podman.compose.project"


def podman_compose() -> str | None:
    return shutil.which("podman-compose") or next(
        (p for p in ("/opt/podman-compose/bin/podman-compose",) if Path(p).exists()), None)


def remove_project(project: str) -> None:
    """What `down -v` should remove, removed directly too: a failed `up` may leave any part of it."""
    for kind, listing in (("container", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"]),
                          ("network", ["network", "ls", "-q"])):
        ids = subprocess.run(["podman", *listing, "--filter", f"label={PROJECT_LABEL}={project}"],
                             capture_output=True, text=True).stdout.split()
        if ids:
            rm = ["podman", "rm", "-f", "-v", "-t", "0"] if kind == "container" else ["podman", kind, "rm", "-f"]
            subprocess.run([*rm, *ids], capture_output=True, timeout=120)


def remove_leftovers() -> None:
    """Projects of earlier runs (named qmcompose<pid>) whose pytest is gone."""
    out = subprocess.run(["podman", "ps", "-a", "--format", f'{{{{index .Labels "{PROJECT_LABEL}"}}}}'],
                         capture_output=True, text=True).stdout.split()
    for project in set(out):
        pid = project.removeprefix(PREFIX)
        if project.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            remove_project(project)


def diagnose(project: str) -> str:
    """Each mesh node's status and recent log, for a failure message."""
    parts = [subprocess.run(["podman", "ps", "-a", "--filter", f"label={PROJECT_LABEL}={project}", "--format",
                             "{{.Names}} {{.Status}}"], capture_output=True, text=True).stdout]
    for node in ("alpha", "beta", "gamma"):
        ids = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={project}",
                              "--filter", f"label=com.docker.compose.service={node}"],
                             capture_output=True, text=True).stdout.split()
        for cid in ids:
            status = subprocess.run(["podman", "exec", cid, "quicmesh", "status"], capture_output=True,
                                    text=True, timeout=30)
            log = subprocess.run(["podman", "logs", "--tail", "40", cid], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=30).stdout
            parts.append(f"--- {node}: status\n{status.stdout}{status.stderr}--- {node}: log\n{log}")
    return "\n".join(parts)


def test_compose_mesh_comes_up_and_tester_passes(image: str, measured):
    tool = podman_compose()
    if tool is None:
        pytest.skip("podman-compose not installed: run `bash .ci/setup-containers.sh` as root")
    remove_leftovers()
    project = f"{PREFIX}{os.getpid()}"
    compose = [tool, "-f", str(COMPOSE_FILE), "-p", project]
    env = {**os.environ, "QUICMESH_IMAGE": image}
    started = time.monotonic()
    try:
        up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        tester = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={project}",
                                 "--filter", "label=com.docker.compose.service=tester"],
                                capture_output=True, text=True).stdout.split()
        assert len(tester) == 1, f"no tester container: {up.stdout}{up.stderr}"
        try:
            waited = subprocess.run(["podman", "wait", tester[0]], capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("tester still running after 150 s")
        logs = subprocess.run(["podman", "logs", tester[0]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True).stdout
        measured.add("compose: up until tester verdict", f"{time.monotonic() - started:.1f} s")
        assert waited.stdout.strip() == "0", f"tester exited {waited.stdout.strip()}:\n{logs}{diagnose(project)}"
        assert "tester: PASS" in logs
        for node in ("alpha", "beta", "gamma"):
            ids = subprocess.run(["podman", "ps", "-q", "--filter", f"label={PROJECT_LABEL}={project}",
                                  "--filter", f"label=com.docker.compose.service={node}"],
                                 capture_output=True, text=True).stdout.split()
            assert len(ids) == 1, f"{node} is not running"
            inspect = subprocess.run(["podman", "inspect", "--format",
                                      "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}",
                                      ids[0]], capture_output=True, text=True).stdout
            assert inspect.startswith("10001") and " true " in inspect, inspect
            # The node answers its health check (degraded is fine: the tester has left the mesh).
            check = subprocess.run(["podman", "exec", ids[0], "quicmesh", "status", "--check"],
                                   capture_output=True, text=True)
            assert check.returncode in (0, 2), check.stderr
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "0"], env=env, capture_output=True, timeout=180)
        remove_project(project)
