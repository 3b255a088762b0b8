"""quicmesh.config: the node.toml format of docs/CONFIG.md, its errors, and the example config."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.config import (
    Address,
    Config,
    ControlSection,
    ForwardConfig,
    HealthSection,
    Limits,
    MetricsSection,
    SecuritySection,
    LogSection,
    MeshSection,
    NatSection,
    NodeSection,
    PeerConfig,
    PubSubSection,
    RelaySection,
    ServiceConfig,
    StorageSection,
    Timers,
    TlsSection,
    load_config,
    normalize_fingerprint,
    parse_address,
    parse_config,
    render_config,
)
from quicmesh.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "node.example.toml"
FP = "sha256:" + "ab" * 32

MINIMAL = """\
[node]
name = "alpha"
mesh = "prod"
listen = "127.0.0.1:4433"

[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"
"""

FULL = MINIMAL + f"""\
crl = "crl.pem"
denylist = ["{FP.upper().replace("SHA256", "sha256")}"]

[[peers]]
name = "beta"
address = "10.0.0.2:4433"

[[peers]]
name = "gamma"
address = "[2001:db8::3]:5000"
fingerprint = "SHA256:{":".join(["CD"] * 32)}"

[limits]
max_datagram_size = 1350
max_message_size = 1048576
datagram_queue = 256
message_window = 120
max_requests_in_flight = 100

[timers]
keepalive = 0.5
dead_after = 2
backoff_min = 0.1
backoff_max = 0.1
handshake_timeout = 3.5

[control]
socket = "run/node.sock"

[log]
level = "debug"
format = "json"
"""


def make_files(folder: Path, key_mode: int = 0o600) -> Path:
    """The files [tls] names, with dummy content: config never parses certificates."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "node.crt", "crl.pem"):
        (folder / name).write_text("-----BEGIN DUMMY-----\n")
    key = folder / "node.key"
    key.write_text("-----BEGIN DUMMY KEY-----\n")
    key.chmod(key_mode)
    return folder


def write_config(folder: Path, text: str, name: str = "node.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def valid_data() -> dict[str, Any]:
    return tomllib.loads(FULL)


def errors_of(data: Any, base_dir: Path = Path("/etc/quicmesh"), check_files: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir, check_files=check_files)
    return info.value.errors


# --- valid configs -----------------------------------------------------------------------------------
def test_full_config(tmp_path: Path) -> None:
    config = load_config(write_config(make_files(tmp_path), FULL))
    assert config.path == tmp_path / "node.toml"
    assert config.node == NodeSection("alpha", "prod", Address("127.0.0.1", 4433))
    assert config.tls == TlsSection(
        ca=tmp_path / "ca.crt", cert=tmp_path / "node.crt", key=tmp_path / "node.key",
        crl=tmp_path / "crl.pem", denylist=(FP,),
    )
    assert config.peers == (
        PeerConfig("beta", Address("10.0.0.2", 4433), None),
        PeerConfig("gamma", Address("2001:db8::3", 5000), "sha256:" + "cd" * 32),
    )
    assert config.limits == Limits(1350, 1048576, 256, 120, 100)
    assert config.timers == Timers(0.5, 2.0, 0.1, 0.1, 3.5)
    assert isinstance(config.timers.dead_after, float)  # an integer is accepted for seconds
    assert config.control == ControlSection(tmp_path / "run" / "node.sock")
    assert config.log == LogSection("debug", "json")
    assert config.peer("gamma") is config.peers[1]
    assert config.peer("alpha") is None


def test_minimal_config_takes_the_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(make_files(tmp_path), MINIMAL))
    assert config.tls.crl is None
    assert config.tls.denylist == ()
    assert config.peers == ()
    assert config.limits == Limits()
    assert config.limits.max_message_size == 16 * 1024 * 1024
    assert config.timers == Timers()
    assert config.log == LogSection("info", "text")
    assert config.control.socket == tmp_path / "quicmesh.sock"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(make_files(tmp_path), MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.name = "beta"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_files(tmp_path / "pki")
    (tmp_path / "conf" / "certs").mkdir(parents=True)
    (tmp_path / "pki" / "node.crt").rename(tmp_path / "conf" / "certs" / "node.crt")
    (tmp_path / "home").mkdir()
    (tmp_path / "pki" / "crl.pem").rename(tmp_path / "home" / "crl.pem")
    text = MINIMAL.replace('"ca.crt"', '"../pki/ca.crt"').replace('"node.crt"', '"certs/node.crt"')
    text = text.replace('"node.key"', f'"{tmp_path}/pki/node.key"') + 'crl = "~/crl.pem"\n'
    monkeypatch.chdir(tmp_path / "pki")  # the working directory must not matter
    config = load_config(write_config(tmp_path / "conf", text))
    assert config.tls.ca == tmp_path / "conf" / ".." / "pki" / "ca.crt"
    assert config.tls.cert == tmp_path / "conf" / "certs" / "node.crt"
    assert config.tls.key == tmp_path / "pki" / "node.key"
    assert config.tls.crl == tmp_path / "home" / "crl.pem"
    assert config.control.socket == tmp_path / "conf" / "quicmesh.sock"


def test_to_dict_is_plain_json_ready_data(tmp_path: Path) -> None:
    config = load_config(write_config(make_files(tmp_path), FULL))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["tls"]["ca"] == str(tmp_path / "ca.crt")
    assert data["peers"][1] == {"name": "gamma", "address": "[2001:db8::3]:5000", "fingerprint": "sha256:" + "cd" * 32}
    assert "fingerprint" not in data["peers"][0]  # TOML has no null: unset optional keys are left out
    assert data["timers"]["dead_after"] == 2.0
    assert set(data) == {"node", "tls", "peers", "limits", "timers", "control", "log", "security", "metrics",
                         "health", "storage", "relay", "pubsub", "mesh", "nat", "services", "forwards"}


# --- errors, each with its key path -----------------------------------------------------------------
def _set(path: str, value: Any):
    """A mutation of valid_data(): set (or, with value DELETE, remove) the key at a dotted path."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = re.findall(r"[^.\[\]]+", path)
        target: Any = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


DELETE = object()
ERROR_CASES = [
    (_set("node.name", "Alpha"), "node.name: invalid node name 'Alpha': it has upper-case letters (use lower case)"),
    (_set("node.mesh", "-prod"), "node.mesh: invalid mesh name '-prod': it starts or ends with '-'"),
    (_set("node.mesh", 7), "node.mesh: mesh name must be a string, got int"),
    (_set("node.listen", DELETE), "node.listen: missing required key"),
    (_set("node.listen", "alpha"), 'node.listen: invalid address "alpha": no port (expected "HOST:PORT" or "[IPv6]:PORT")'),
    (_set("tls.key", DELETE), "tls.key: missing required key"),
    (_set("tls.ca", ""), "tls.ca: must not be empty"),
    (_set("tls.ca", ["ca.crt"]), "tls.ca: must be a path string, got an array"),
    (_set("tls.crl", "a\0b"), "tls.crl: must not contain a NUL character"),
    (_set("tls.denylist", FP), 'tls.denylist: must be an array of fingerprints ("sha256:<hex>"), got "' + FP + '"'),
    (_set("tls.denylist", [FP, "md5:00"]), 'tls.denylist[1]: invalid fingerprint "md5:00": expected "sha256:" '
                                           "followed by 64 hex digits (colons between bytes allowed)"),
    (_set("peers[1].adress", "x:1"), "peers[1].adress: unknown key, did you mean 'address'?"),
    (_set("peers[1].address", DELETE), "peers[1].address: missing required key"),
    (_set("peers[0].colour", "red"), "peers[0].colour: unknown key (known keys: name, address, fingerprint)"),
    (_set("peers[0].name", "alpha"), "peers[0].name: 'alpha' is this node itself; a node does not list itself as a peer"),
    (_set("peers[1].name", "beta"), "peers[1].name: duplicate peer 'beta' (also peers[0])"),
    (_set("peers[0].name", "b_eta"), "peers[0].name: invalid peer name 'b_eta': only a-z, 0-9 and '-' are allowed"),
    (_set("peers[0].address", "10.0.0.2:0"), 'peers[0].address: invalid address "10.0.0.2:0": port 0 is out of range (1..65535)'),
    (_set("peers[0].fingerprint", "sha256:abc"), 'peers[0].fingerprint: invalid fingerprint "sha256:abc": expected '
                                                 '"sha256:" followed by 64 hex digits (colons between bytes allowed)'),
    (_set("peers[0].fingerprint", "ab" * 32), f'peers[0].fingerprint: invalid fingerprint "{"ab" * 32}": expected '
                                              '"sha256:" followed by 64 hex digits (colons between bytes allowed); '
                                              "add the 'sha256:' prefix"),
    (_set("peers", {"name": "beta"}), "peers: must be an array of tables: write [[peers]] (one per peer), not [peers]"),
    (_set("peers", ["beta"]), 'peers[0]: must be a table, got "beta"'),
    (_set("limits.max_datagram_size", "big"), 'limits.max_datagram_size: must be an integer between 1200 and 65527, got "big"'),
    (_set("limits.max_datagram_size", 1199), "limits.max_datagram_size: must be an integer between 1200 and 65527, got 1199"),
    (_set("limits.max_datagram_size", 1500.0), "limits.max_datagram_size: must be an integer between 1200 and 65527, got 1500.0"),
    (_set("limits.max_message_size", 0), "limits.max_message_size: must be an integer between 1 and 1073741824, got 0"),
    (_set("limits.max_message_size", 2**30 + 1), "limits.max_message_size: must be an integer between 1 and 1073741824, got 1073741825"),
    (_set("limits.datagram_queue", 0), "limits.datagram_queue: must be an integer between 1 and 1000000, got 0"),
    (_set("limits.message_window", 121), "limits.message_window: must be an integer between 1 and 120, got 121"),
    (_set("limits.message_window", True), "limits.message_window: must be an integer between 1 and 120, got true"),
    (_set("limits.max_requests_in_flight", 101), "limits.max_requests_in_flight: must be an integer between 1 and 100, got 101"),
    (_set("timers.keepalive", 0), "timers.keepalive: must be a number of seconds, > 0 and <= 86400, got 0"),
    (_set("timers.keepalive", -1.5), "timers.keepalive: must be a number of seconds, > 0 and <= 86400, got -1.5"),
    (_set("timers.handshake_timeout", math.inf), "timers.handshake_timeout: must be a number of seconds, > 0 and <= 86400, got inf"),
    (_set("timers.handshake_timeout", math.nan), "timers.handshake_timeout: must be a number of seconds, > 0 and <= 86400, got nan"),
    (_set("timers.backoff_min", "1s"), 'timers.backoff_min: must be a number of seconds, > 0 and <= 86400, got "1s"'),
    (_set("timers.backoff_min", False), "timers.backoff_min: must be a number of seconds, > 0 and <= 86400, got false"),
    (_set("timers.dead_after", 0.5), "timers.dead_after: must be greater than timers.keepalive (0.5), got 0.5"),
    (_set("timers.backoff_max", 0.05), "timers.backoff_max: must be at least timers.backoff_min (0.1), got 0.05"),
    (_set("log.level", "warn"), "log.level: must be one of debug, info, warning, error, got \"warn\", did you mean 'warning'?"),
    (_set("log.format", "xml"), 'log.format: must be one of text, json, got "xml"'),
    (_set("limit", {}), "limit: unknown section, did you mean 'limits'?"),
    (_set("peer", [{}]), "peer: unknown section, did you mean 'peers'?"),
    (_set("database", {}), "database: unknown section (known sections: node, tls, peers, limits, timers, control, "
                                "log, security, metrics, health, storage, relay, pubsub, mesh, nat, services, forwards)"),
    (_set("listen", "0.0.0.0:1"), "listen: unknown section; 'listen' belongs in [node] or [metrics] or [[forwards]]"),
    (_set("tls.kye", "node.key"), "tls.kye: unknown key, did you mean 'key'?"),
    (_set("log", "debug"), 'log: must be a table, got "debug"'),
    (_set("node.my key", 1), 'node."my key": unknown key (known keys: name, mesh, listen)'),
]


@pytest.mark.parametrize(("mutate", "expected"), ERROR_CASES)
def test_each_error_names_its_key_path(mutate, expected: str) -> None:
    data = valid_data()
    mutate(data)
    assert errors_of(data) == [expected]


def test_missing_sections() -> None:
    assert errors_of({}) == ["node: missing required section", "tls: missing required section"]
    assert errors_of([]) == ["the config must be a table of sections, got an array"]


def test_timer_order_blames_the_key_that_was_written() -> None:
    data = tomllib.loads(MINIMAL + "[timers]\nkeepalive = 5\n")
    assert errors_of(data) == ["timers.keepalive: must be less than timers.dead_after (3.0, the default), got 5.0"]
    data = tomllib.loads(MINIMAL + "[timers]\nbackoff_min = 30\n")
    assert errors_of(data) == ["timers.backoff_min: must be at most timers.backoff_max (10.0, the default), got 30.0"]


def test_bad_timer_values_do_not_also_report_their_order() -> None:
    data = tomllib.loads(MINIMAL + '[timers]\nkeepalive = "x"\ndead_after = 0.1\n')
    assert errors_of(data) == ['timers.keepalive: must be a number of seconds, > 0 and <= 86400, got "x"']


def test_every_error_is_reported_at_once() -> None:
    text = """\
nod = {}
[node]
name = "Alpha"
mesh = "prod"
listen = "0.0.0.0:99999"
[tls]
ca = "ca.crt"
cert = "node.crt"
[[peers]]
name = "beta"
adress = "10.0.0.2:4433"
[[peers]]
name = "beta"
address = "10.0.0.3:4433"
[limits]
max_datagram_size = "big"
[log]
level = "loud"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), Path("/etc/quicmesh"), source="node.toml", check_files=False)
    assert info.value.errors == [
        "nod: unknown section, did you mean 'node'?",
        "node.name: invalid node name 'Alpha': it has upper-case letters (use lower case)",
        'node.listen: invalid address "0.0.0.0:99999": port 99999 is out of range (0..65535)',
        "tls.key: missing required key",
        "peers[0].adress: unknown key, did you mean 'address'?",
        "peers[0].address: missing required key",
        "peers[1].name: duplicate peer 'beta' (also peers[0])",
        'limits.max_datagram_size: must be an integer between 1200 and 65527, got "big"',
        'log.level: must be one of debug, info, warning, error, got "loud"',
    ]
    assert info.value.source == "node.toml"
    assert str(info.value).startswith("node.toml: 9 errors:\n  nod: unknown section")


# --- fingerprints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [FP, FP.upper(), "sha256:" + ":".join(["AB"] * 32), "Sha256:" + "aB" * 32])
def test_fingerprints_are_normalized(text: str) -> None:
    assert normalize_fingerprint(text) == FP


@pytest.mark.parametrize("text", ["", "sha256:", "sha1:" + "ab" * 20, "sha256:" + "ab" * 31, "sha256:" + "zz" * 32,
                                  "sha256 " + "ab" * 32, "sha256:" + "ab" * 33, "sha256:a:b" + "cd" * 31, 42])
def test_bad_fingerprints(text: Any) -> None:
    with pytest.raises(ValueError, match="sha256"):
        normalize_fingerprint(text)


# --- files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_file_is_accepted(tmp_path: Path, mode: int) -> None:
    config = load_config(write_config(make_files(tmp_path, key_mode=mode), MINIMAL))
    assert config.tls.key == tmp_path / "node.key"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    folder = make_files(tmp_path / "my keys", key_mode=mode)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(folder, MINIMAL))
    key = folder / "node.key"
    assert info.value.errors == [
        f"tls.key: {key} is accessible by group/others (mode 0{mode:o}); run: chmod 600 '{key}'"
    ]


def test_key_file_mode_is_not_checked_without_check_files(tmp_path: Path) -> None:
    folder = make_files(tmp_path, key_mode=0o644)
    assert load_config(write_config(folder, MINIMAL), check_files=False).tls.key == folder / "node.key"


def test_missing_and_odd_files(tmp_path: Path) -> None:
    make_files(tmp_path)
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "node.crt").unlink()
    (tmp_path / "node.crt").mkdir()
    text = MINIMAL + 'crl = "nowhere/crl.pem"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    assert info.value.errors == [
        f"tls.ca: file not found: {tmp_path / 'ca.crt'}",
        f"tls.cert: not a regular file: {tmp_path / 'node.crt'}",
        f"tls.crl: file not found: {tmp_path / 'nowhere' / 'crl.pem'}",
    ]
    # check_files=False skips exactly these checks
    assert load_config(tmp_path / "node.toml", check_files=False).tls.crl == tmp_path / "nowhere" / "crl.pem"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_files(tmp_path)
    ca = tmp_path / "ca.crt"
    ca.chmod(0o000)
    if os.geteuid() == 0:  # root reads anything: show it what another user would see
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ca and real_access(path, mode))
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, MINIMAL))
    assert info.value.errors == [f"tls.ca: not readable by this user: {tmp_path / 'ca.crt'}"]


# --- the control socket ---------------------------------------------------------------------------------
def _long_dir(tmp_path: Path) -> Path:
    folder = tmp_path / ("deep-" * 20) / "conf"
    assert len(str(folder / "quicmesh.sock")) >= 108
    return folder


def test_socket_defaults_to_the_config_folder(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(MINIMAL), tmp_path, check_files=False)
    assert config.control.socket == tmp_path / "quicmesh.sock"


def test_too_long_default_socket_falls_back_to_the_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    socket = parse_config(tomllib.loads(MINIMAL), _long_dir(tmp_path), check_files=False).control.socket
    assert socket.parent == tmp_path
    assert re.fullmatch(r"quicmesh-alpha-[0-9a-f]{10}\.sock", socket.name)
    # derived from the config folder alone, so `quicmesh status` finds what `quicmesh run` made
    assert parse_config(tomllib.loads(MINIMAL), _long_dir(tmp_path), check_files=False).control.socket == socket
    other = parse_config(tomllib.loads(MINIMAL), _long_dir(tmp_path) / "x", check_files=False).control.socket
    assert other != socket


@pytest.mark.parametrize("runtime_dir", [None, "", "relative/dir", "/" + "r" * 100])
def test_too_long_default_socket_falls_back_to_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   runtime_dir: str | None) -> None:
    if runtime_dir is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    socket = parse_config(tomllib.loads(MINIMAL), _long_dir(tmp_path), check_files=False).control.socket
    assert socket.parent == Path("/tmp")
    assert socket.name.startswith("quicmesh-alpha-")


def test_explicit_long_socket_path_is_an_error(tmp_path: Path) -> None:
    data = tomllib.loads(MINIMAL + '[control]\nsocket = "quicmesh.sock"\n')
    errors = errors_of(data, _long_dir(tmp_path))
    path = _long_dir(tmp_path) / "quicmesh.sock"
    assert errors == [f"control.socket: {path} is too long for a Unix socket (at most 107 bytes); "
                      "choose a shorter path, e.g. under /run or /tmp"]


def test_socket_path_of_107_bytes_fits() -> None:
    data = tomllib.loads(MINIMAL + f'[control]\nsocket = "/{"s" * 106}"\n')
    assert len(str(parse_config(data, Path("/"), check_files=False).control.socket)) == 107
    data = tomllib.loads(MINIMAL + f'[control]\nsocket = "/{"s" * 107}"\n')
    assert len(errors_of(data)) == 1


# --- render_config ------------------------------------------------------------------------------------
def test_render_round_trips(tmp_path: Path) -> None:
    config = load_config(write_config(make_files(tmp_path), FULL))
    text = render_config(config)
    assert text.startswith("# quicmesh resolved config")
    again = parse_config(tomllib.loads(text), Path("/elsewhere"), check_files=True)
    assert again == dataclasses.replace(config, path=None)
    assert render_config(again) == text.replace(f'# loaded from "{tmp_path / "node.toml"}"\n', "")


def test_render_round_trips_odd_paths_and_minimal_configs() -> None:
    weird = 'dir "with" quotes\\and\ttabs\n/é ☃ \x7f.crt'
    data = tomllib.loads(MINIMAL)
    data["tls"]["ca"] = weird
    data["peers"] = []
    config = parse_config(data, Path("/base"), check_files=False)
    assert config.tls.ca == Path("/base", weird)
    assert parse_config(tomllib.loads(render_config(config)), Path("/"), check_files=False) == config


# --- addresses ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "host", "port", "shown"), [
    ("127.0.0.1:4433", "127.0.0.1", 4433, None),
    ("0.0.0.0:1", "0.0.0.0", 1, None),
    ("[::1]:4433", "::1", 4433, None),
    ("[2001:db8::1]:65535", "2001:db8::1", 65535, None),
    ("[::ffff:10.0.0.1]:53", "::ffff:10.0.0.1", 53, None),
    ("[fe80::1%eth0]:4433", "fe80::1%eth0", 4433, None),
    ("localhost:4433", "localhost", 4433, None),
    ("node-1.Mesh.example.com:9", "node-1.Mesh.example.com", 9, None),
    ("example.com.:80", "example.com.", 80, None),
    ("host:0080", "host", 80, "host:80"),
])
def test_good_addresses(text: str, host: str, port: int, shown: str | None) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert str(address) == (shown or text)
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(("text", "reason"), [
    ("", "it is empty"),
    ("host", "no port"),
    ("host:", "the port is missing"),
    (":4433", "the host is missing"),
    ("::1:4433", 'needs brackets: "[::1]:4433"'),
    ("[::1]4433", 'expected "[IPv6]:PORT"'),
    ("[::1]", 'expected "[IPv6]:PORT"'),
    ("[::1]:", "the port is missing"),
    ("[1.2.3.4]:1", "is not an IPv6 address"),
    ("[fe80::1%a\"b]:1", "invalid zone id"),
    ("[fe80::1%\ud800]:1", "invalid zone id"),
    ("1.2.3.256:1", "not a valid IPv4 address"),
    ("01.2.3.4:1", "not a valid IPv4 address"),
    ("a b:1", "whitespace"),
    (" host:1", "whitespace"),
    ("host:65536", "out of range (1..65535)"),
    ("host:0", "out of range (1..65535)"),
    ("host:-1", "is not a number"),
    ("host:+1", "is not a number"),
    ("host:\u0663", "is not a number"),
    ("host:123456", "is not a number"),
    ("-bad.example:1", "not a valid host name"),
    ("under_score:1", "not a valid host name"),
    ("a..b:1", "not a valid host name"),
    ("x" * 64 + ":1", "not a valid host name"),
    (4433, "must be an address string"),
])
def test_bad_addresses(text: Any, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert reason in str(info.value)


def test_port_zero_only_when_allowed() -> None:
    assert parse_address("0.0.0.0:0", allow_port_zero=True) == Address("0.0.0.0", 0)
    assert parse_address("[::]:0", allow_port_zero=True) == Address("::", 0)


# --- loading files -------------------------------------------------------------------------------------
def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.errors == [f"config file not found: {tmp_path / 'nope.toml'}"]
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: config file not found: {tmp_path / 'nope.toml'}"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.errors == [f"config file is a directory: {tmp_path}"]


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[node]\nname = "alpha"\nmesh "prod"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    (error,) = info.value.errors
    assert error.startswith(f"invalid TOML in {path}: ")
    assert "line 3, column 6" in error
    assert "\n" not in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"invalid TOML in {path}: not UTF-8 text (bad byte at offset 15)"]


def test_deeply_nested_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(path, check_files=False).node.name == "alpha"


# --- the example config cannot drift --------------------------------------------------------------------
def _keys_by_section(text: str) -> dict[str, set[str]]:
    """Keys per section, counting commented-out ones ('# fingerprint = ...') as documented."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        if header := re.match(r"#?\s*\[\[?([a-z_]+)\]\]?", line):  # "# [[services]]": a commented example
            section = header.group(1)
            keys.setdefault(section, set())
        elif key := re.match(r"#?\s*([a-z_]+)\s*=", line):
            keys[section].add(key.group(1))
    return keys


def test_example_config_parses_and_documents_every_key() -> None:
    config = load_config(EXAMPLE, check_files=False)
    assert config.node.name == "alpha"
    text = EXAMPLE.read_text()
    sections = {f.name for f in dataclasses.fields(Config)} - {"path"}
    classes = {"node": NodeSection, "tls": TlsSection, "peers": PeerConfig, "limits": Limits,
               "timers": Timers, "control": ControlSection, "log": LogSection,
               "security": SecuritySection, "metrics": MetricsSection, "health": HealthSection,
               "storage": StorageSection, "relay": RelaySection, "pubsub": PubSubSection, "mesh": MeshSection, "nat": NatSection,
               "services": ServiceConfig,
               "forwards": ForwardConfig}
    assert set(classes) == set(sections)
    assert _keys_by_section(text) == {
        name: {f.name for f in dataclasses.fields(cls)} for name, cls in classes.items()
    }
    for line in text.splitlines():
        if re.match(r"[a-z_]+\s*=", line):
            assert "#" in line, f"key without a comment: {line!r}"


def test_example_config_shows_the_defaults() -> None:
    config = load_config(EXAMPLE, check_files=False)
    assert config.limits == Limits()
    assert config.timers == Timers()
    assert config.log == LogSection()
    assert config.security == SecuritySection()


def test_example_config_matches_the_doc() -> None:
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert tomllib.loads(block) == tomllib.loads(EXAMPLE.read_text())


# --- nothing but ConfigError escapes --------------------------------------------------------------------
KNOWN_KEYS = sorted({"node", "tls", "peers", "limits", "timers", "control", "log", "security", "metrics",
                     "health", "services", "forwards"} | {
    f.name for cls in (NodeSection, TlsSection, PeerConfig, Limits, Timers, ControlSection, LogSection,
                       SecuritySection, MetricsSection, HealthSection, ServiceConfig, ForwardConfig)
    for f in dataclasses.fields(cls)
})
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
scalars = st.one_of(
    st.text(max_size=20), st.integers(), st.floats(), st.booleans(),
    st.sampled_from(["alpha", "beta", "127.0.0.1:1", "[::1]:0", FP, "info", "ca.crt", "/", "~", ""]),
)
toml_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                         max_leaves=25)


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_files(tmp_path_factory.mktemp("files"))


def _parse_or_config_error(data: Any, base_dir: Path, check_files: bool) -> None:
    try:
        config = parse_config(data, base_dir, check_files=check_files)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) for m in e.errors)
        return
    assert isinstance(config, Config)
    render_config(config)


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(toml_like, st.dictionaries(keys, toml_like, max_size=8)), check_files=st.booleans())
def test_arbitrary_data_gives_a_config_or_a_config_error(files_dir: Path, data: Any, check_files: bool) -> None:
    _parse_or_config_error(data, files_dir, check_files)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.sampled_from(["node", "tls", "peers", "limits", "timers", "control", "log"]),
                             st.integers(0, 5), keys, st.one_of(toml_like, st.just(DELETE))), max_size=4),
    check_files=st.booleans(),
)
def test_edited_valid_config_gives_a_config_or_a_config_error(files_dir: Path, edits, check_files: bool) -> None:
    data = copy.deepcopy(valid_data())
    for section, index, key, value in edits:
        table = data.get(section)
        if isinstance(table, list) and table:
            table = table[index % len(table)]
        if not isinstance(table, dict):
            continue
        if value is DELETE:
            table.pop(key, None)
        else:
            table[key] = value
    _parse_or_config_error(data, files_dir, check_files)


# --- UDP service forwarding -------------------------------------------------------------------------------
FORWARDING = FULL + """
[[services]]
name = "game"
target = "127.0.0.1:7777"
allow = ["beta"]

[[services]]
name = "dns"
target = "localhost:53"

[[forwards]]
listen = "127.0.0.1:5000"
peer = "gamma"
service = "game"
"""


def test_services_and_forwards(tmp_path: Path) -> None:
    config = load_config(write_config(make_files(tmp_path), FORWARDING))
    assert config.services == (ServiceConfig("game", Address("127.0.0.1", 7777), ("beta",)),
                               ServiceConfig("dns", Address("localhost", 53), None))
    assert config.forwards == (ForwardConfig(Address("127.0.0.1", 5000), "gamma", "game"),)
    assert config.limits.max_flows_per_peer == 256 and config.limits.forward_idle_timeout == 60.0
    data = config.to_dict()
    assert data["services"][1] == {"name": "dns", "target": "localhost:53"}  # allow left out: every peer
    assert load_config(write_config(tmp_path, render_config(config), "resolved.toml")) == dataclasses.replace(
        config, path=tmp_path / "resolved.toml")


FORWARDING_ERRORS = [
    (_set("services[1].name", "game"), "services[1].name: duplicate service 'game' (also services[0])"),
    (_set("services[0].name", "Game"), "services[0].name: invalid service name 'Game': it has upper-case letters (use lower case)"),
    (_set("services[0].target", "127.0.0.1:0"), 'services[0].target: invalid address "127.0.0.1:0": port 0 is out of range (1..65535)'),
    (_set("services[0].target", DELETE), "services[0].target: missing required key"),
    (_set("services[0].allow", ["beta", "gama"]), "services[0].allow[1]: 'gama' is not a configured peer, did you mean 'gamma'?"),
    (_set("services[0].allow", ["beta", "beta"]), "services[0].allow[1]: duplicate peer 'beta'"),
    (_set("services[0].allow", "beta"), 'services[0].allow: must be an array of peer names, e.g. ["beta"], got "beta"'),
    (_set("services[0].port", 1), "services[0].port: unknown key (known keys: name, target, allow)"),
    (_set("forwards[0].peer", "zzz"), "forwards[0].peer: 'zzz' is not a configured peer (configured peers: beta, gamma)"),
    (_set("forwards[0].servce", "x"), "forwards[0].servce: unknown key, did you mean 'service'?"),
    (_set("forwards[0].listen", "127.0.0.1:4433"), "forwards[0].listen: 127.0.0.1:4433 is this node's own QUIC port (node.listen)"),
    (_set("forwards", {"listen": "127.0.0.1:1"}), "forwards: must be an array of tables: write [[forwards]] (one per forward), not [forwards]"),
    (_set("limits.max_flows_per_peer", 0), "limits.max_flows_per_peer: must be an integer between 1 and 16384, got 0"),
    (_set("limits.forward_idle_timeout", 0), "limits.forward_idle_timeout: must be a number of seconds, > 0 and <= 86400, got 0"),
]


@pytest.mark.parametrize(("mutate", "expected"), FORWARDING_ERRORS)
def test_forwarding_errors_name_their_key_path(mutate, expected: str) -> None:
    data = tomllib.loads(FORWARDING)
    mutate(data)
    assert errors_of(data) == [expected]


def test_duplicate_forward_listen_addresses() -> None:
    data = tomllib.loads(FORWARDING)
    data["forwards"].append(dict(data["forwards"][0], service="dns"))
    assert errors_of(data) == ["forwards[1].listen: duplicate listen address 127.0.0.1:5000 (also forwards[0])"]


# --- [security] and [metrics] ---------------------------------------------------------------------------
def test_security_and_metrics_sections_parse_and_report_errors() -> None:
    data = valid_data()
    data["security"] = {"allowlist": ["10.0.0.0/8", "192.0.2.7", "2001:db8::1/32"], "allowlist_peers": True,
                        "retry": True, "handshake_rate": 0, "max_pending_handshakes": 8}
    data["metrics"] = {"listen": "127.0.0.1:9464"}
    config = parse_config(data, Path("/"), check_files=False)
    assert config.security.allowlist == ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")
    assert config.security.allowlist_peers and config.security.retry
    assert config.security.handshake_rate == 0.0 and config.security.max_pending_handshakes == 8
    assert str(config.metrics.listen) == "127.0.0.1:9464"
    assert parse_config(tomllib.loads(render_config(config)), Path("/"), check_files=False) == config
    data["security"] = {"allowlist": ["10.0.0.0/33", 7], "retry": "yes", "handshake_rate": -1, "alowlist": []}
    assert errors_of(data) == [
        "security.alowlist: unknown key, did you mean 'allowlist'?",
        'security.allowlist[0]: must be an IP address or CIDR network such as "10.0.0.0/8", got "10.0.0.0/33"',
        'security.allowlist[1]: must be an IP address or CIDR network such as "10.0.0.0/8", got 7',
        'security.retry: must be true or false, got "yes"',
        "security.handshake_rate: must be a number per second between 0 (no limit) and 1000000, got -1",
    ]
