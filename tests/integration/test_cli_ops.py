"""Operator commands against real nodes (separate `quicmesh run` processes on 127.0.0.1, real certificates):
status exit codes for every case, ping, doctor naming the real cause, completion and the man page."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from quicmesh.ops.control import NodeUnreachableError
from quicmesh.ops.demo import LocalNode, make_local_mesh
from tests.conftest import RunningMesh, quicmesh_env
from tests.pki_helpers import Made, make_leaf

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> object:
    """Poll ``condition`` (a node not answering yet counts as not met) until it holds, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except NodeUnreachableError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met within the timeout")


@pytest.fixture(scope="module")
def two_of_three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """alpha and beta running and connected; gamma configured everywhere but never started."""
    mesh = RunningMesh(make_local_mesh(tmp_path_factory.mktemp("mesh")))
    try:
        mesh.start("alpha", "beta")
        wait_for(lambda: mesh.status("alpha")["peers_connected"] == 1 and mesh.status("beta")["peers_connected"] == 1,
                 timeout=15)
        yield mesh
    finally:
        mesh.stop(timeout=2.0)


def edited_config(node: LocalNode, folder: Path, **addresses: str) -> Path:
    """A copy of ``node``'s config (same certificate files) with some peers' addresses replaced."""
    text = node.config.read_text()
    for peer, address in addresses.items():
        text, count = re.subn(rf'(name = "{peer}"\naddress = )"[^"]*"', rf'\1"{address}"', text)
        assert count == 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.toml").write_text(text)
    return folder / "node.toml"


def mesh_ca(mesh: RunningMesh) -> Made:
    folder = mesh.nodes["alpha"].config.parent.parent / "ca"
    cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    return Made(cert, serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None))


def write_leaf(made: Made, folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "future.crt", folder / "future.key"
    cert.write_bytes(made.pem)
    key.write_bytes(made.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key.chmod(0o600)
    return cert, key


def doctor(cli, config: Path, *args: str, **kwargs) -> tuple[int, str]:
    result = cli("doctor", "-c", str(config), *args, "--timeout", "3", **kwargs)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def problem(output: str) -> str:
    """The PROBLEM and FIX lines, which must be the last two."""
    lines = output.splitlines()
    assert lines[-2].startswith("PROBLEM: ") and lines[-1].startswith("FIX: "), output
    return "\n".join(lines[-2:])


# --- status: every exit code, by a real node ----------------------------------------------------------
def test_status_exit_codes(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    alpha = two_of_three.socket("alpha")
    result = cli("status", "--socket", alpha)
    assert result.returncode == CRITICAL and "peers 1/2 connected" in result.stdout  # default: every peer
    for rule in ("1", "50%", "0"):
        assert cli("status", "--socket", alpha, "--min-peers", rule).returncode == WARNING
    assert cli("status", "--socket", alpha, "--min-peers", "2").returncode == CRITICAL
    assert cli("status", "--socket", alpha, "--min-peers", "51%").returncode == CRITICAL
    check = cli("status", "--check", "--socket", alpha, "--min-peers", "1")
    assert (check.returncode, check.stdout) == (WARNING, "")
    assert check.stderr.startswith("quicmesh: WARNING: alpha: 1/2 peers connected (required 1, min_peers 1); "
                                   "not connected: gamma")
    document = json.loads(cli("status", "--json", "--socket", alpha).stdout)
    assert (document["min_peers"], document["peers_required"]) == ("100%", 2)
    unreachable = cli("status", "--socket", two_of_three.socket("gamma"))
    assert unreachable.returncode == CRITICAL and "cannot reach the node" in unreachable.stderr
    (tmp_path / "bad.toml").write_text("[node\n")
    assert cli("status", "-c", str(tmp_path / "bad.toml")).returncode == UNKNOWN
    assert cli("status", "--socket", alpha, "--min-peers", "x").returncode == UNKNOWN


def test_the_nodes_health_rule_comes_from_its_config_and_drop_ins(cli, two_of_three: RunningMesh) -> None:
    beta = two_of_three.nodes["beta"]
    drop_in = beta.config.parent / "conf.d" / "50-health.toml"
    drop_in.parent.mkdir()
    try:
        drop_in.write_text("[health]\nmin_peers = 1\n")
        assert cli("check-config", "--quiet", "-c", str(beta.config)).stdout == ""
        two_of_three.signal("beta", signal.SIGHUP)
        wait_for(lambda: two_of_three.status("beta")["min_peers"] == "1")
        assert cli("status", "--socket", str(beta.socket)).returncode == WARNING  # the node's own rule
        assert cli("status", "--socket", str(beta.socket), "--min-peers", "100%").returncode == CRITICAL
    finally:
        shutil.rmtree(drop_in.parent)
        two_of_three.signal("beta", signal.SIGHUP)
        wait_for(lambda: two_of_three.status("beta")["min_peers"] == "100%")


def test_status_ok_once_every_peer_is_connected(cli, running_mesh: RunningMesh) -> None:
    result = cli("status", "--check", "--socket", running_mesh.socket("alpha"))
    assert (result.returncode, result.stdout, result.stderr) == (OK, "", "")
    assert cli("status", "--socket", running_mesh.socket("alpha"), "--min-peers", "0").returncode == OK


# --- ping ---------------------------------------------------------------------------------------------
def test_ping_a_connected_peer(cli, two_of_three: RunningMesh) -> None:
    result = cli("ping", "--socket", two_of_three.socket("alpha"), "beta", "-c", "3", "--interval", "0.05")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [re.sub(r"time=\S+", "time=T", line) for line in lines[:3]] == [
        f"beta (direct): seq={n} time=T" for n in (1, 2, 3)]
    assert re.fullmatch(r"--- beta ping: 3 sent, 3 received, 0% loss, rtt min/avg/max \S+/\S+/\S+", lines[3])
    summary = json.loads(cli("ping", "--socket", two_of_three.socket("alpha"), "beta", "-c", "2", "--interval", "0",
                             "--json").stdout)
    assert (summary["sent"], summary["received"], summary["loss"], summary["path"]) == (2, 2, 0.0, "direct")
    assert 0 < summary["rtt_min"] <= summary["rtt_avg"] <= summary["rtt_max"] < 1.0


def test_ping_a_peer_that_is_down_or_unknown(cli, two_of_three: RunningMesh) -> None:
    lost = cli("ping", "--socket", two_of_three.socket("alpha"), "gamma", "-c", "2", "--interval", "0")
    assert lost.returncode == 1
    assert lost.stdout.splitlines() == ["gamma: seq=1 lost: peer gamma is not connected",
                                        "gamma: seq=2 lost: peer gamma is not connected",
                                        "--- gamma ping: 2 sent, 0 received, 100% loss"]
    unknown = cli("ping", "--socket", two_of_three.socket("alpha"), "omega")
    assert unknown.returncode == 1 and unknown.stderr.startswith("quicmesh: error: ") and "omega" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1


# --- doctor -------------------------------------------------------------------------------------------
def test_doctor_all_good(cli, two_of_three: RunningMesh) -> None:
    code, output = doctor(cli, two_of_three.nodes["alpha"].config, "beta")
    assert code == 0, output
    assert output.splitlines()[-1] == "all good"
    assert "beta at 127.0.0.1:" in output and "identity quicmesh://demo/beta" in output
    assert two_of_three.status("beta")["peers_connected"] == 1  # the doctor's handshake took no one's place


def test_doctor_closed_port(cli, two_of_three: RunningMesh) -> None:
    code, output = doctor(cli, two_of_three.nodes["alpha"].config)  # every peer: gamma is not running
    assert code == 1
    assert "QUIC handshake done, identity quicmesh://demo/beta" in output  # beta passed first
    assert problem(output).startswith(f"PROBLEM: gamma at 127.0.0.1:{two_of_three.nodes['gamma'].port}: "
                                      "nothing listens on UDP port")


def test_doctor_wrong_peer_name(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    """gamma's config sends beta's address to alpha: a valid certificate of the mesh, but not beta's."""
    alpha_port = two_of_three.nodes["alpha"].port
    config = edited_config(two_of_three.nodes["gamma"], tmp_path, beta=f"127.0.0.1:{alpha_port}")
    code, output = doctor(cli, config, "beta")
    assert code == 1
    assert problem(output) == (
        f"PROBLEM: the node at 127.0.0.1:{alpha_port} is not beta: expected node 'beta', but the certificate "
        "is for quicmesh://demo/alpha\n"
        "FIX: peers[1].address points at another node: set it to beta's address")


def test_doctor_wrong_ca(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    """A node named beta answers, but from another mesh's CA (same mesh name, another CA)."""
    impostor = RunningMesh(make_local_mesh(tmp_path / "other"))
    try:
        impostor.start("beta")
        wait_for(lambda: impostor.nodes["beta"].socket.exists())
        config = edited_config(two_of_three.nodes["alpha"], tmp_path / "alpha",
                               beta=f"127.0.0.1:{impostor.nodes['beta'].port}")
        code, output = doctor(cli, config, "beta")
    finally:
        impostor.stop(timeout=2.0)
    assert code == 1
    text = problem(output)
    assert text.startswith(f"PROBLEM: beta at 127.0.0.1:{impostor.nodes['beta'].port} presented a certificate that "
                           f"this mesh's CA ({two_of_three.nodes['alpha'].config.parent}/ca.crt) did not issue: node "
                           "certificate quicmesh://demo/beta, issued by ")
    assert "FIX: issue beta's certificate from this mesh's CA (quicmesh-pki sign beta)" in text


def test_doctor_clock_skew_of_this_node(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=5)
    cert, key = write_leaf(make_leaf(mesh_ca(two_of_three), "alpha", mesh="demo", not_before=soon,
                                     not_after=soon + dt.timedelta(days=30)), tmp_path)
    config = edited_config(two_of_three.nodes["alpha"], tmp_path)
    text = re.sub(r'cert = "[^"]*"', f'cert = "{cert}"', config.read_text())
    config.write_text(re.sub(r'key = "[^"]*"', f'key = "{key}"', text))
    code, output = doctor(cli, config)
    assert code == 1
    text = problem(output)
    assert text.startswith("PROBLEM: this node's certificate is not valid before ")
    assert "5 hours from now by this machine's clock: clock skew" in text and "NTP" in text


PEER_WITH_A_FUTURE_CERT = """
import asyncio, sys
from aioquic.asyncio import serve
from aioquic.quic.configuration import QuicConfiguration
from quicmesh.protocol import wire

async def main():
    configuration = QuicConfiguration(is_client=False, alpn_protocols=[wire.ALPN])
    configuration.load_cert_chain(sys.argv[1], sys.argv[2])
    await serve("127.0.0.1", int(sys.argv[3]), configuration=configuration)
    print("listening", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_doctor_clock_skew_of_a_peer(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    """A QUIC server presenting beta's certificate from the mesh CA, valid only from 3 hours from now (a
    quicmesh node refuses to start with it, so a plain aioquic server stands in for the peer)."""
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=3)
    cert, key = write_leaf(make_leaf(mesh_ca(two_of_three), "beta", mesh="demo", not_before=soon,
                                     not_after=soon + dt.timedelta(days=30)), tmp_path)
    port = two_of_three.nodes["gamma"].port  # free: gamma never runs
    server = subprocess.Popen([sys.executable, "-c", PEER_WITH_A_FUTURE_CERT, str(cert), str(key), str(port)],
                              stdout=subprocess.PIPE, text=True, env=quicmesh_env())
    try:
        assert server.stdout is not None and server.stdout.readline() == "listening\n"
        config = edited_config(two_of_three.nodes["alpha"], tmp_path / "alpha", beta=f"127.0.0.1:{port}")
        code, output = doctor(cli, config, "beta")
    finally:
        server.kill()
        server.wait()
    assert code == 1
    text = problem(output)
    assert text.startswith("PROBLEM: beta's certificate is not valid before ")
    assert "3 hours from now by this machine's clock: clock skew" in text


def test_doctor_key_readable_by_others(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    alpha = two_of_three.nodes["alpha"].config.parent
    shutil.copytree(alpha, tmp_path / "alpha", ignore=shutil.ignore_patterns("*.sock", "*.log"))
    config = tmp_path / "alpha" / "node.toml"
    config.write_text(config.read_text().replace(str(alpha), str(tmp_path / "alpha")))
    (tmp_path / "alpha" / "node.key").chmod(0o644)
    code, output = doctor(cli, config)
    assert code == 1
    assert problem(output) == (f"PROBLEM: the private key {tmp_path}/alpha/node.key can be read by group or "
                               f"others (mode 0644)\nFIX: chmod 600 {tmp_path}/alpha/node.key")


def test_doctor_unreadable_key(cli, two_of_three: RunningMesh) -> None:
    """Run as a user who cannot read the key (as root: the doctor runs as nobody; else: mode 000)."""
    alpha = two_of_three.nodes["alpha"].config.parent
    folder = Path(tempfile.mkdtemp(prefix="quicmesh-doctor-"))  # not under pytest's 0700 folder: nobody must enter
    try:
        for name in ("ca.crt", "node.crt", "crl.pem", "node.key"):
            shutil.copy(alpha / name, folder / name)
        config = folder / "node.toml"
        config.write_text(two_of_three.nodes["alpha"].config.read_text().replace(str(alpha), str(folder)))
        for path in folder.iterdir():
            path.chmod(0o600 if path.name == "node.key" else 0o644)
        folder.chmod(0o755)
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
                       "quicmesh", "doctor", "-c", str(config)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                    env={**quicmesh_env(), "HOME": "/tmp"}, cwd="/")
            user = "nobody"
        else:
            (folder / "node.key").chmod(0)
            result = cli("doctor", "-c", str(config))
            user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 1, result.stderr
    assert problem(result.stdout) == (
        f"PROBLEM: {folder}/node.key (tls.key) cannot be read by the user {user} running this\n"
        f"FIX: run quicmesh as the node's user (the owner of {folder}/node.key), or give {user} access: "
        f"chown {user} {folder}/node.key")


def test_doctor_unknown_peer_and_broken_config(cli, two_of_three: RunningMesh, tmp_path: Path) -> None:
    code, output = doctor(cli, two_of_three.nodes["alpha"].config, "omega")
    assert code == 1 and "PROBLEM: omega is not a configured peer of alpha (peers: beta, gamma)" in output
    (tmp_path / "node.toml").write_text('[node]\nname = "alpha"\n')
    code, output = doctor(cli, tmp_path / "node.toml")
    assert code == 1 and problem(output).startswith(f"PROBLEM: the config is invalid: {tmp_path}/node.toml: ")


# --- completion and the man page ------------------------------------------------------------------
SUBCOMMANDS = ["run", "check-config", "status", "send", "request", "listen", "ping", "doctor", "demo", "bench",
               "completion", "man"]


def subcommands_of_the_parser() -> list[str]:
    from quicmesh.cli import build_parser
    from quicmesh.commands.manual import commands

    return [command.name for command in commands(build_parser())]


def test_every_subcommand_is_listed() -> None:
    assert set(SUBCOMMANDS) <= set(subcommands_of_the_parser())


def bash_complete(script: Path, *words: str) -> list[str]:
    line = " ".join(words)
    program = (f"source {script}\nCOMP_WORDS=({line})\nCOMP_CWORD={len(words) - 1}\n"
               "_quicmesh\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion(cli, tmp_path: Path) -> None:
    result = cli("completion", "bash")
    assert result.returncode == 0
    script = tmp_path / "quicmesh.bash"
    script.write_text(result.stdout)
    assert set(subcommands_of_the_parser()) <= set(bash_complete(script, "quicmesh", "''"))
    assert bash_complete(script, "quicmesh", "st") == ["status"]
    assert set(bash_complete(script, "quicmesh", "status", "--m")) == {"--min-peers"}
    assert bash_complete(script, "quicmesh", "run", "--log-level", "w") == ["warning"]
    assert bash_complete(script, "quicmesh", "completion", "''") == ["bash", "zsh", "fish"]
    assert {"--count", "-c", "--config", "--socket", "--interval", "--json"} <= set(
        bash_complete(script, "quicmesh", "ping", "-"))


@pytest.mark.parametrize("shell, marker", [("zsh", "#compdef quicmesh"), ("fish", "complete -c quicmesh")])
def test_zsh_and_fish_completion_name_every_subcommand(cli, shell: str, marker: str) -> None:
    result = cli("completion", shell)
    assert result.returncode == 0 and marker in result.stdout
    for name in subcommands_of_the_parser():
        assert re.search(rf"(-a {name} |'{name}:)", result.stdout), name
    if executable := shutil.which(shell):
        check = subprocess.run([executable, "-n"], input=result.stdout, capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stderr


def test_man_page(cli, tmp_path: Path) -> None:
    result = cli("man")
    assert result.returncode == 0 and result.stdout.startswith(".TH QUICMESH 1 ")
    for name in subcommands_of_the_parser():
        assert f"\n.SS {name}\n" in result.stdout, name
    assert "QUICMESH_CONFIG" in result.stdout and "\\-\\-min\\-peers" in result.stdout
    if shutil.which("groff"):
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=result.stdout, capture_output=True,
                                  text=True, timeout=30)
        assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
        assert "quicmesh doctor" in rendered.stdout
