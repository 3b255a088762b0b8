"""The health checks of the deploy artifacts read `quicmesh status` exit codes the monitoring-plugin way
(0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN): each check's own shell command runs with a stand-in `quicmesh`
that exits with each code, and must call a container unhealthy exactly when it should."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
yaml = pytest.importorskip("yaml", reason="PyYAML parses the manifests: it belongs in the test extra")

ALIVE = {0: True, 1: True, 2: False, 3: False}  # a missing peer (WARNING with --min-peers 0) is not ours


def containerfile_check() -> str:
    text = (DEPLOY / "Containerfile").read_text()
    match = re.search(r"HEALTHCHECK [^\n]*\\\n\s+CMD (.+)", text)
    assert match, "no HEALTHCHECK ... CMD in the Containerfile"
    return match.group(1)


def compose_check() -> str:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    kind, command = services["alpha"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    return command.replace("$$", "$")  # compose's escape for a literal $


def k8s_probe(name: str) -> str:
    docs = [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "statefulset.yaml").read_text()) if doc]
    (sts,) = [doc for doc in docs if doc.get("kind") == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    command = container[name]["exec"]["command"]
    assert command[:2] == ["sh", "-c"], command
    return command[2]


def judge(command: str, code: int, tmp_path: Path) -> tuple[bool, list[str]]:
    """Run a health-check command with a `quicmesh` that exits ``code``: (healthy?, the args it got)."""
    calls = tmp_path / "calls"
    stub = tmp_path / "quicmesh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit {code}\n')
    stub.chmod(0o755)
    result = subprocess.run(["sh", "-c", command], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=10,
                            capture_output=True, text=True)
    return result.returncode == 0, calls.read_text().splitlines()


@pytest.mark.parametrize("source", ["Containerfile", "compose", "k8s liveness"])
def test_liveness_checks_fail_only_when_the_daemon_does_not_answer(source: str, tmp_path: Path) -> None:
    command = {"Containerfile": containerfile_check, "compose": compose_check,
               "k8s liveness": lambda: k8s_probe("livenessProbe")}[source]()
    for code, alive in ALIVE.items():
        healthy, calls = judge(command, code, tmp_path)
        assert healthy is alive, (source, code, command)
        assert calls[-1] == "status --check --min-peers 0"


def test_readiness_means_min_peers_met(tmp_path: Path) -> None:
    """Ready while the node's [health] min_peers are connected: OK or WARNING."""
    command = k8s_probe("readinessProbe")
    for code, ready in {0: True, 1: True, 2: False, 3: False}.items():
        healthy, calls = judge(command, code, tmp_path)
        assert healthy is ready and calls[-1] == "status --check"
