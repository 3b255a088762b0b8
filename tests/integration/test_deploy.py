"""Static checks of the deploy artifacts (fast, no containers): they parse, and the names, ports and
paths that must agree across files do. tests/containers runs compose.yaml and the image for real."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NODE_UID = "10001"


def load_all(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the manifests: it belongs in the test extra")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ----------------------------------------------------------------------------------------- Containerfile

def test_containerfile_contract():
    text = (DEPLOY / "Containerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in text
    assert f"USER {NODE_UID}:{NODE_UID}" in text
    assert "EXPOSE 4433/udp" in text
    assert re.search(r"HEALTHCHECK .*\\\n\s+CMD quicmesh status --check", text)
    assert "QUICMESH_CONTROL_SOCKET=/run/quicmesh/quicmesh.sock" in text
    assert 'ENTRYPOINT ["quicmesh"]\nCMD ["run", "-c", "/etc/quicmesh/node.toml"]' in text
    assert "--no-index" in text  # the build must not need a network


def test_setup_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "setup-containers.sh")], check=True)


# ---------------------------------------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return load_all(DEPLOY / "compose.yaml")[0]


NODES = ("alpha", "beta", "gamma", "tester")


def test_compose_services(compose):
    assert set(compose["services"]) == {"pki-init", *NODES}


def test_compose_bootstrap_names_match_hostnames_and_volumes(compose):
    services = compose["services"]
    script = services["pki-init"]["command"][0]
    bootstrapped = dict(re.findall(r"\b([a-z0-9-]+)=([a-z0-9.-]+):4433\b", script))
    assert bootstrapped == {node: node for node in NODES}  # cert names = hostnames = peer addresses
    init_volumes = services["pki-init"]["volumes"]
    for node in NODES:
        assert services[node]["hostname"] == node
        assert services[node]["volumes"] == [f"{node}:/etc/quicmesh:ro"]
        assert f"{node}:/out/{node}" in init_volumes
        assert node in compose["volumes"]
    # The CA key stays in the volume only pki-init mounts.
    assert all("ca:" not in v for node in NODES for v in services[node]["volumes"])


def test_compose_hardening(compose):
    for name, service in compose["services"].items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
    assert compose["services"]["pki-init"]["cap_add"] == ["CHOWN"]
    for node in NODES:
        assert any(t.startswith("/run/quicmesh") for t in compose["services"][node]["tmpfs"])
        assert compose["services"][node]["networks"] == ["mesh"]
    assert compose["networks"]["mesh"]["internal"] is True


def test_compose_health_and_ordering(compose):
    services = compose["services"]
    for node in NODES[:3]:
        assert "quicmesh status --check" in services[node]["healthcheck"]["test"][1]
        assert services[node]["depends_on"]["pki-init"]["condition"] == "service_completed_successfully"
        assert services["tester"]["depends_on"][node]["condition"] == "service_healthy"
    tester = services["tester"]["command"][0]
    assert "quicmesh status --wait" in tester and "--check" in tester  # it checks itself, too


# ---------------------------------------------------------------------------------------------- systemd

UNIT = DEPLOY / "systemd" / "quicmesh.service"


def _verify(unit_text: str, tmp_path: Path, name: str = "quicmesh.service") -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify, with ExecStart's binary stubbed (verify insists that it exists); a template
    (``name`` with ``@.``) is verified as its instance ``@alpha``."""
    stub = tmp_path / "quicmesh"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / name
    unit.write_text(unit_text.replace("/opt/quicmesh/bin/quicmesh", str(stub)))
    return subprocess.run(["systemd-analyze", "verify", str(unit).replace("@.", "@alpha.")], capture_output=True,
                          text=True, timeout=60)


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd; .ci/setup-containers.sh installs it)")


@needs_systemd_analyze
def test_systemd_unit_verifies_clean(tmp_path):
    proc = _verify(UNIT.read_text(), tmp_path)
    assert proc.stderr == "" and proc.returncode == 0


@needs_systemd_analyze
def test_systemd_verify_would_catch_a_mistake(tmp_path):
    proc = _verify(UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"), tmp_path)
    assert "ProtectSytem" in proc.stderr


@needs_systemd_analyze
def test_systemd_unit_is_sandboxed(tmp_path):
    stub = tmp_path / "quicmesh"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "quicmesh.service"
    unit.write_text(UNIT.read_text().replace("/opt/quicmesh/bin/quicmesh", str(stub)))
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for quicmesh.service: ([\d.]+)", proc.stdout)
    assert exposure, proc.stdout + proc.stderr
    assert float(exposure.group(1)) <= 2.0  # systemd's scale: 0 (locked down) .. 10 (unprotected)


def test_systemd_unit_contract():
    keys = [line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and line[0] != "#"]
    unit = {}
    for key, value in keys:
        unit.setdefault(key, []).append(value)
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["RuntimeDirectory"] == ["quicmesh"]
    assert "QUICMESH_CONTROL_SOCKET=/run/quicmesh/quicmesh.sock" in unit["Environment"][0]
    assert unit["User"] == ["quicmesh"]
    sysusers = (DEPLOY / "systemd" / "quicmesh.sysusers.conf").read_text()
    assert re.search(r"^u quicmesh ", sysusers, re.M)
    for setting in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes"):
        key, value = setting.split("=")
        assert unit[key] == [value]


TEMPLATE = DEPLOY / "systemd" / "quicmesh@.service"


@needs_systemd_analyze
def test_systemd_template_unit_verifies_clean(tmp_path):
    proc = _verify(TEMPLATE.read_text(), tmp_path, "quicmesh@.service")
    assert proc.stderr == "" and proc.returncode == 0
    mistaken = _verify(TEMPLATE.read_text().replace("WatchdogSec=", "WatchdogSek="), tmp_path, "quicmesh@.service")
    assert "WatchdogSek" in mistaken.stderr


def test_systemd_template_is_the_unit_per_instance():
    """Same service as quicmesh.service, but each instance has its own config folder, socket and runtime dir."""
    single, template = UNIT.read_text(), TEMPLATE.read_text()
    settings = [line for line in template.splitlines() if "=" in line and not line.startswith("#")]
    assert "ExecStart=/opt/quicmesh/bin/quicmesh run -c /etc/quicmesh/%i/node.toml" in settings
    assert "ExecStartPre=/opt/quicmesh/bin/quicmesh check-config -c /etc/quicmesh/%i/node.toml" in settings
    assert "RuntimeDirectory=quicmesh/%i" in settings
    assert any("QUICMESH_CONTROL_SOCKET=/run/quicmesh/%i/quicmesh.sock" in line for line in settings)
    instance_free = {line.replace("/%i", "").replace(" %i", "") for line in settings}
    assert instance_free == {line for line in single.splitlines() if "=" in line and not line.startswith("#")}
    for unit in (single, template):
        assert "WatchdogSec=30s" in unit and "Type=notify" in unit


# ------------------------------------------------------------------------------------------- kubernetes

@pytest.fixture(scope="module")
def k8s() -> dict:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_all(path):
            docs[doc["kind"]] = doc
    return docs


def test_k8s_service_is_headless_udp_and_publishes_not_ready(k8s):
    spec = k8s["Service"]["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert [(p["port"], p["protocol"]) for p in spec["ports"]] == [(4433, "UDP")]


def test_k8s_statefulset_matches_service(k8s):
    sts, svc = k8s["StatefulSet"], k8s["Service"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    assert spec["serviceName"] == svc["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = pod["containers"]
    port = {p["name"]: p for p in container["ports"]}[svc["spec"]["ports"][0]["targetPort"]]
    assert (port["containerPort"], port["protocol"]) == (4433, "UDP")
    assert pod["securityContext"]["runAsUser"] == int(NODE_UID)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "quicmesh" in " ".join(container["readinessProbe"]["exec"]["command"])


def test_k8s_each_ordinal_has_its_secret(k8s):
    sts = k8s["StatefulSet"]
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (init,) = pod["initContainers"]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    generated = {g["name"] for g in k8s["Kustomization"]["secretGenerator"]}
    for ordinal in range(replicas):
        node = f"{name}-{ordinal}"
        volume = volumes[mounts[f"/nodes/{node}"]]
        assert volume["secret"]["secretName"] == node
        assert node in generated
    # The daemon's container never mounts the per-node Secrets, only what the init copied.
    (container,) = pod["containers"]
    assert {m["name"] for m in container["volumeMounts"]} == {"config", "run"}
    for mount in init["volumeMounts"] + container["volumeMounts"]:
        assert mount["name"] in volumes


def test_k8s_secrets_hold_what_bootstrap_writes(k8s, tmp_path):
    """Run the documented bootstrap (peers at <sts>-N.<svc>) and check every Secret file exists."""
    sts, svc = k8s["StatefulSet"], k8s["Service"]["metadata"]["name"]
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    nodes = [f"{name}-{i}" for i in range(replicas)]
    out = tmp_path / "pki"
    pki = Path(sys.executable).with_name("quicmesh-pki")
    subprocess.run([str(pki), "bootstrap", "prod", *(f"{n}={n}.{svc}:4433" for n in nodes), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    for generator in k8s["Kustomization"]["secretGenerator"]:
        for file in generator["files"]:
            assert (out / Path(file).relative_to("pki")).is_file(), file
    toml = (out / nodes[0] / "node.toml").read_text()
    for peer in nodes[1:]:
        assert f'address = "{peer}.{svc}:4433"' in toml
    # The init container copies exactly the files each Secret holds.
    script = sts["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    for file in k8s["Kustomization"]["secretGenerator"][0]["files"]:
        assert f"$src/{Path(file).name}" in script
    documented = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    assert all(f"{n}={n}.{svc}:4433" in documented for n in nodes)
