"""The `quicmesh` command without a running node: usage and config errors are one line, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VALID = """\
[node]
name = "alpha"
mesh = "prod"
listen = "127.0.0.1:4433"

[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"

[[peers]]
name = "beta"
address = "127.0.0.1:4434"
"""


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """A folder with a node.toml and placeholder cert files (config checks only that they exist)."""
    for name in ("ca.crt", "node.crt", "node.key"):
        (tmp_path / name).write_text("placeholder\n")
    (tmp_path / "node.key").chmod(0o600)
    (tmp_path / "node.toml").write_text(VALID)
    return tmp_path


def assert_one_line_errors(result, count: int = 1) -> list[str]:
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == count, result.stderr
    assert all(line.startswith("quicmesh: error: ") for line in lines), result.stderr
    return lines


BAD_CONFIGS = {
    "toml-syntax": (VALID.replace('name = "alpha"', "name = alpha"), "invalid TOML"),
    "unknown-key": (VALID + "\n[timers]\ndead_aftr = 3.0\n", "timers.dead_aftr: unknown key, did you mean 'dead_after'?"),
    "wrong-type": (VALID.replace('"127.0.0.1:4433"', "4433"), "node.listen: must be an address string"),
    "duplicate-peer": (VALID + '\n[[peers]]\nname = "beta"\naddress = "127.0.0.1:4435"\n', "duplicate peer 'beta'"),
    "self-as-peer": (VALID + '\n[[peers]]\nname = "alpha"\naddress = "127.0.0.1:4433"\n', "is this node itself"),
    "missing-cert": (VALID.replace('"node.crt"', '"missing.crt"'), "tls.cert: file not found"),
}


@pytest.mark.parametrize("command, case", [("check-config", case) for case in sorted(BAD_CONFIGS)]
                         + [("run", "toml-syntax"), ("run", "self-as-peer")])  # run loads configs the same way
def test_bad_config_is_one_line_and_exit_2(cli, node_dir: Path, command: str, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    (node_dir / "node.toml").write_text(text)
    result = cli(command, "-c", str(node_dir / "node.toml"))
    assert result.returncode == 2
    [line] = assert_one_line_errors(result)
    assert expected in line
    assert str(node_dir / "node.toml") in line  # which file


def test_world_readable_key_is_refused_with_the_fix(cli, node_dir: Path) -> None:
    (node_dir / "node.key").chmod(0o644)
    result = cli("run", "-c", str(node_dir / "node.toml"))
    assert result.returncode == 2
    [line] = assert_one_line_errors(result)
    assert "tls.key" in line and "0644" in line and "chmod 600" in line


def test_missing_config_file(cli, tmp_path: Path) -> None:
    result = cli("check-config", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    [line] = assert_one_line_errors(result)
    assert "config file not found" in line


def test_every_error_at_once(cli, node_dir: Path) -> None:
    (node_dir / "node.key").chmod(0o640)
    (node_dir / "node.toml").write_text(VALID.replace('mesh = "prod"', 'mesh = "Prod"'))
    result = cli("check-config", "-c", str(node_dir / "node.toml"))
    assert result.returncode == 2
    lines = assert_one_line_errors(result, count=2)
    assert "node.mesh" in lines[0] and "tls.key" in lines[1]


def test_check_config_json_reports_errors(cli, node_dir: Path) -> None:
    (node_dir / "node.toml").write_text(VALID + "\n[timers]\ndead_aftr = 3.0\n")
    result = cli("check-config", "--json", "-c", str(node_dir / "node.toml"))
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["ok"] is False and any("did you mean 'dead_after'" in e for e in report["errors"])


@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_check_config_refuses_placeholder_certificates(cli, node_dir: Path, quiet: list[str]) -> None:
    result = cli("check-config", *quiet, "-c", str(node_dir / "node.toml"))
    assert result.returncode == 2 and result.stdout == ""
    lines = assert_one_line_errors(result, count=3)  # --quiet: errors still on stderr
    assert [line.split()[2] for line in lines] == ["tls.cert:", "tls.key:", "tls.ca:"]


def test_status_without_a_daemon_is_critical(cli, tmp_path: Path) -> None:
    result = cli("status", "--socket", str(tmp_path / "quicmesh.sock"))
    assert result.returncode == 2
    [line] = assert_one_line_errors(result)
    assert "cannot reach the node at" in line and "is `quicmesh run` running?" in line


def test_status_check_and_wait_without_a_daemon(cli, node_dir: Path) -> None:
    result = cli("status", "--check", "--wait", "0.5", "-c", str(node_dir / "node.toml"))
    assert result.returncode == 2
    assert_one_line_errors(result)
    assert result.stdout == ""


@pytest.mark.parametrize("variable", ["QUICMESH_SOCKET", "QUICMESH_CONTROL_SOCKET"])
def test_status_uses_the_environment_socket(cli, tmp_path: Path, variable: str) -> None:
    path = tmp_path / "env.sock"
    result = cli("status", env={variable: str(path)})
    assert result.returncode == 2
    assert str(path) in result.stderr


def test_socket_resolution_order(cli, node_dir: Path) -> None:
    """--socket, else $QUICMESH_SOCKET, else $QUICMESH_CONTROL_SOCKET, else the config's control.socket; the
    config is -c, else $QUICMESH_CONFIG (the error names the socket it tried)."""
    first, second, config = node_dir / "first.sock", node_dir / "second.sock", str(node_dir / "node.toml")
    both = {"QUICMESH_SOCKET": str(first), "QUICMESH_CONTROL_SOCKET": str(second), "QUICMESH_CONFIG": config}
    cases = [
        (["--socket", str(node_dir / "flag.sock")], both, "flag.sock"),
        ([], both, "first.sock"),
        ([], {"QUICMESH_CONTROL_SOCKET": str(second), "QUICMESH_CONFIG": config}, "second.sock"),
        ([], {"QUICMESH_CONFIG": config}, f"{node_dir}/quicmesh.sock"),
        (["-c", config], {"QUICMESH_CONFIG": "/nonexistent/node.toml"}, f"{node_dir}/quicmesh.sock"),
    ]
    for args, env, tried in cases:
        result = cli("status", *args, env=env)
        assert result.returncode == 2, (args, env, result.stderr)
        [line] = assert_one_line_errors(result)
        assert f"cannot reach the node at {node_dir}/" in line and tried in line, (args, env, line)


def test_config_resolution_order(cli, node_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """check-config reads -c, else $QUICMESH_CONFIG, else /etc/quicmesh/node.toml."""
    other = tmp_path_factory.mktemp("other") / "node.toml"
    other.write_text(VALID.replace('name = "alpha"', 'name = "omega"'))
    config = str(node_dir / "node.toml")
    for args, env, expected in [(["-c", config], {"QUICMESH_CONFIG": str(other)}, str(node_dir)),
                                ([], {"QUICMESH_CONFIG": str(other)}, str(other.parent))]:
        result = cli("check-config", "--json", *args, env=env)
        errors = json.loads(result.stdout)["errors"]
        assert errors and all(f"{expected}/" in error for error in errors), errors
    missing = cli("check-config", env={"QUICMESH_CONFIG": str(node_dir / "gone.toml")})
    assert missing.returncode == 2
    [line] = assert_one_line_errors(missing)
    assert line.endswith(f"config file not found: {node_dir}/gone.toml (from $QUICMESH_CONFIG)")


@pytest.mark.skipif(Path("/etc/quicmesh/node.toml").exists(), reason="this machine has a default config")
@pytest.mark.parametrize("command", [["run"], ["check-config"], ["check-config", "--quiet"], ["doctor"],
                                     ["status"], ["send", "beta", "hi"], ["ping", "beta"]])
def test_missing_default_config_is_one_line_naming_what_was_tried(cli, command: list[str]) -> None:
    result = cli(*command)
    assert result.returncode == (3 if command == ["status"] else 2)
    [line] = assert_one_line_errors(result)
    assert "$QUICMESH_CONFIG" in line and "/etc/quicmesh/node.toml does not exist" in line
    if command[0] in ("status", "send", "ping"):
        assert "--socket, $QUICMESH_SOCKET, $QUICMESH_CONTROL_SOCKET" in line


@pytest.mark.parametrize("args, code, expected", [
    (["status", "--min-peers", "most", "--socket", "x"], 3, "a number of peers (3) or a percentage (75%)"),
    (["status", "--min-peers", "120%", "--socket", "x"], 3, "at most 100%"),
    (["check-config", "--json", "--quiet"], 2, "not allowed with argument"),
    (["ping", "beta", "-c", "0", "--socket", "x"], 2, "expected a whole number >= 1"),
    (["ping", "--socket", "x"], 2, "required: peer"),
    (["completion", "tcsh"], 2, "invalid choice: 'tcsh'"),
    (["status", "--bogus"], 3, "unrecognized arguments: --bogus"),
    (["status", "--wait", "soon", "--socket", "x"], 3, "not a number of seconds"),
    (["status", "-c", "a.toml", "--socket", "x"], 3, "not allowed with argument"),
    (["send", "beta"], 2, "required: DATA"),
    (["listen", "--count", "0", "--socket", "x"], 2, "expected a whole number >= 1"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ([], 2, "required: COMMAND"),
    (["demo", "--nodes", "20"], 2, "--nodes must be between 2 and 8"),
])
def test_usage_errors(cli, args: list[str], code: int, expected: str) -> None:
    result = cli(*args)
    assert result.returncode == code
    [line] = assert_one_line_errors(result)
    assert expected in line


def test_status_with_a_bad_config_exits_3(cli, tmp_path: Path) -> None:
    result = cli("status", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 3
    assert_one_line_errors(result)


@pytest.mark.parametrize("command", [["send", "beta", "hi"], ["request", "beta", "hi"], ["listen"], ["ping", "beta"]])
def test_client_commands_without_a_daemon(cli, tmp_path: Path, command: list[str]) -> None:
    result = cli(*command, "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    [line] = assert_one_line_errors(result)
    assert "cannot reach the node" in line


def test_socket_path_too_long(cli) -> None:
    result = cli("status", "--socket", "/tmp/" + "x" * 120)
    assert result.returncode == 3  # UNKNOWN: the question could not even be asked
    [line] = assert_one_line_errors(result)
    assert "more than the 107 a Unix socket allows" in line


def test_a_file_that_is_not_a_socket(cli, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    result = cli("status", "--socket", str(tmp_path / "plain"))
    assert result.returncode == 2
    assert_one_line_errors(result)


def test_help_documents_exit_codes(cli) -> None:
    result = cli("status", "--help")
    assert result.returncode == 0
    for line in ("0 OK ", "1 WARNING ", "2 CRITICAL ", "no node answers", "3 UNKNOWN ", "--min-peers 0"):
        assert line in result.stdout


def test_version(cli) -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("quicmesh ")
