"""Fixtures for the containers tier: real quicmesh nodes in rootful podman containers.

The whole directory skips, with the reason, where it cannot run (not root, no podman, no base image and
.ci/setup-containers.sh cannot make one). Numbers measured by the tests are printed at the end of the
session, because they are the point of this tier as much as the pass/fail.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from containers import cluster as harness  # noqa: E402

HERE = Path(__file__).resolve().parent
MEASURED = harness.Measurements()


@functools.cache
def unavailable() -> str | None:
    """Why this tier cannot run here, or None. Makes the base image on first use if possible."""
    if os.geteuid() != 0:
        return "containers tier needs root (rootful podman); run as root, as CI does"
    if shutil.which("podman") is None:
        return "podman not installed: run `bash .ci/setup-containers.sh` as root"
    if subprocess.run(["podman", "image", "exists", harness.BASE_IMAGE]).returncode != 0:
        setup = subprocess.run(["bash", str(REPO / ".ci" / "setup-containers.sh"), sys.prefix],
                               capture_output=True, text=True, timeout=600)
        if setup.returncode != 0:
            return f"base image {harness.BASE_IMAGE} cannot be built: {setup.stderr.strip()[-500:]}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.fspath)).parents]
    if mine and (reason := unavailable()):
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if MEASURED.rows:
        terminalreporter.section("quicmesh containers: measured")
        width = max(len(what) for what, _ in MEASURED.rows)
        for what, value in MEASURED.rows:
            terminalreporter.write_line(f"{what:<{width}}  {value}")


@pytest.fixture(scope="session")
def measured() -> harness.Measurements:
    return MEASURED


@pytest.fixture(scope="session")
def image() -> str:
    """localhost/quicmesh:test built from this checkout (reused while the sources are unchanged)."""
    started = time.monotonic()
    built = harness.build_image(log=lambda _: None)
    MEASURED.add("app image", f"{'built' if built else 'cached'} in {time.monotonic() - started:.1f} s")
    return harness.IMAGE


@pytest.fixture(scope="session")
def mesh(image: str):
    """One 5-node cluster shared by the tests that leave it whole; measures its convergence from the
    nodes' own peer events."""
    with harness.Cluster(5, image=image) as cluster:
        watches = [cluster.watch_peers(node) for node in cluster.names()]
        try:
            full = {w.node: w.wait(lambda peers, w=w: peers == set(cluster.names()) - {w.node}, timeout=60)
                    for w in watches}
        finally:
            for watch in watches:
                watch.stop()
        if None in full.values() or not cluster.full_mesh():
            pytest.fail("5-node mesh did not converge in 60 s:\n" + "\n".join(
                f"{node}: {status}\n{cluster.logs(node, 15)}" for node, status in cluster.status_all().items()))
        last = max(full.values())  # type: ignore[type-var]
        MEASURED.add("5 containers started", f"in {cluster.up_at - cluster.started_at:.2f} s (one by one)")
        MEASURED.add("full mesh (5 nodes, 10 links)", f"{last - cluster.started_at:.2f} s after the first "
                     f"start, {last - cluster.up_at:.2f} s after the last")
        yield cluster
