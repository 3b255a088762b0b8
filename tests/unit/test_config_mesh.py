"""[mesh] in node.toml (docs/CONFIG.md, docs/MEMBERSHIP.md): every key's values, the cross-key rules, and
that each bad value is one ConfigError line naming its key."""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from quicmesh.config import Address, MeshSection, load_config, parse_config, render_config
from quicmesh.errors import ConfigError

MINIMAL = """\
[node]
name = "alpha"
mesh = "prod"
listen = "0.0.0.0:4433"

[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"
"""

OPEN = MINIMAL + """
[mesh]
members = "any-certified"
seeds = ["seed.example.net:4433", "10.0.0.7:4433", "[2001:db8::7]:4433"]
advertise = ["203.0.113.5:4433"]
connect = "on-demand"
full_mesh_max = 16
neighbors = 6
idle_close = 30
announce_interval = 10
member_timeout = 40.5
gossip_interval = 0.5
max_members = 500
announce_rate = 20
announce_burst = 40
"""


def mesh_of(text: str) -> MeshSection:
    return parse_config(tomllib.loads(text), Path("/etc/quicmesh"), check_files=False).mesh


def errors_with_mesh(**mesh: Any) -> list[str]:
    data = tomllib.loads(MINIMAL)
    data["mesh"] = mesh
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("/etc/quicmesh"), check_files=False)
    return info.value.errors


def test_left_out_it_is_todays_static_mesh() -> None:
    mesh = mesh_of(MINIMAL)
    assert mesh == MeshSection()
    assert mesh.members == "configured" and not mesh.open and mesh.seeds == ()


def test_every_key_is_read() -> None:
    mesh = mesh_of(OPEN)
    assert mesh.open
    assert mesh.seeds == (Address("seed.example.net", 4433), Address("10.0.0.7", 4433), Address("2001:db8::7", 4433))
    assert mesh.advertise == (Address("203.0.113.5", 4433),)
    assert (mesh.connect, mesh.full_mesh_max, mesh.neighbors, mesh.max_members, mesh.announce_burst) == (
        "on-demand", 16, 6, 500, 40)
    assert (mesh.idle_close, mesh.announce_interval, mesh.member_timeout, mesh.gossip_interval,
            mesh.announce_rate) == (30.0, 10.0, 40.5, 0.5, 20.0)
    assert all(isinstance(value, float) for value in (mesh.idle_close, mesh.announce_rate))


def test_render_round_trips_the_section(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(OPEN), tmp_path, check_files=False)
    text = render_config(config)
    assert "[mesh]" in text and 'seeds = ["seed.example.net:4433", "10.0.0.7:4433", "[2001:db8::7]:4433"]' in text
    assert parse_config(tomllib.loads(text), tmp_path, check_files=False) == config


BAD_VALUES = [
    ({"members": "anyone"}, 'mesh.members: must be one of configured, any-certified, got "anyone"'),
    ({"members": "any_certified"}, 'mesh.members: must be one of configured, any-certified, got "any_certified", '
                                   "did you mean 'any-certified'?"),
    ({"members": True}, "mesh.members: must be one of configured, any-certified, got true"),
    ({"connect": "partial"}, 'mesh.connect: must be one of full, on-demand, auto, got "partial"'),
    ({"connect": "ondemand"}, "mesh.connect: must be one of full, on-demand, auto, got \"ondemand\", "
                              "did you mean 'on-demand'?"),
    ({"members": "any-certified", "seeds": "10.0.0.1:4433"},
     'mesh.seeds: must be an array of seed addresses, e.g. ["10.0.0.1:4433"], got "10.0.0.1:4433"'),
    ({"members": "any-certified", "seeds": ["10.0.0.1"]},
     'mesh.seeds[0]: invalid address "10.0.0.1": no port (expected "HOST:PORT" or "[IPv6]:PORT")'),
    ({"members": "any-certified", "seeds": ["10.0.0.1:4433", "10.0.0.1:0"]},
     'mesh.seeds[1]: invalid address "10.0.0.1:0": port 0 is out of range (1..65535)'),
    ({"members": "any-certified", "seeds": ["0.0.0.0:4433"]},
     "mesh.seeds[0]: 0.0.0.0:4433 is a wildcard address: give one other nodes can dial"),
    ({"members": "any-certified", "seeds": ["a.example:1", "a.example:1"]},
     "mesh.seeds[1]: duplicate seed address a.example:1"),
    ({"members": "any-certified", "seeds": [f"10.0.0.{i}:1" for i in range(65)]},
     "mesh.seeds: at most 64 seed addresses, got 65"),
    ({"advertise": ["[::]:4433"]}, "mesh.advertise[0]: [::]:4433 is a wildcard address: give one other nodes can dial"),
    ({"advertise": ["10.0.0.1:4433", 7]}, 'mesh.advertise[1]: must be an address string like "HOST:PORT", got 7'),
    ({"advertise": [f"10.0.0.{i}:1" for i in range(9)]}, "mesh.advertise: at most 8 advertised addresses, got 9"),
    ({"full_mesh_max": 0}, "mesh.full_mesh_max: must be an integer between 1 and 1000000, got 0"),
    ({"full_mesh_max": 64.0}, "mesh.full_mesh_max: must be an integer between 1 and 1000000, got 64.0"),
    ({"neighbors": 0}, "mesh.neighbors: must be an integer between 1 and 1000, got 0"),
    ({"max_members": 1}, "mesh.max_members: must be an integer between 2 and 1000000, got 1"),
    ({"announce_burst": -1}, "mesh.announce_burst: must be an integer between 1 and 1000000, got -1"),
    ({"idle_close": 0}, "mesh.idle_close: must be a number of seconds, > 0 and <= 86400, got 0"),
    ({"gossip_interval": math.inf}, "mesh.gossip_interval: must be a number of seconds, > 0 and <= 86400, got inf"),
    ({"announce_interval": math.nan}, "mesh.announce_interval: must be a number of seconds, > 0 and <= 86400, got nan"),
    ({"member_timeout": "2m"}, 'mesh.member_timeout: must be a number of seconds, > 0 and <= 86400, got "2m"'),
    ({"announce_rate": 0}, "mesh.announce_rate: must be a number per second, > 0 and <= 1000000, got 0"),
    ({"announce_rate": -5.0}, "mesh.announce_rate: must be a number per second, > 0 and <= 1000000, got -5.0"),
    ({"announce_rate": math.inf}, "mesh.announce_rate: must be a number per second, > 0 and <= 1000000, got inf"),
    ({"seed": ["10.0.0.1:4433"]}, "mesh.seed: unknown key, did you mean 'seeds'?"),
]


@pytest.mark.parametrize(("mesh", "expected"), BAD_VALUES)
def test_each_bad_value_is_one_error_naming_its_key(mesh: dict[str, Any], expected: str) -> None:
    assert errors_with_mesh(**mesh) == [expected]


def test_mesh_must_be_a_table() -> None:
    data = tomllib.loads(MINIMAL)
    data["mesh"] = "open"
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("/etc/quicmesh"), check_files=False)
    assert info.value.errors == ['mesh: must be a table, got "open"']


def test_seeds_without_open_membership_are_an_error() -> None:
    expected = ('mesh.seeds: mesh.seeds need mesh.members = "any-certified" (a seed tells this node about members '
                'that are not in [[peers]]), got members = "configured"')
    assert errors_with_mesh(seeds=["10.0.0.1:4433"]) == [expected]
    written = errors_with_mesh(members="configured", seeds=["10.0.0.1:4433"])  # blame what was written
    assert written == [expected.replace("mesh.seeds: ", "mesh.members: ", 1)]
    assert mesh_of(MINIMAL + '[mesh]\nmembers = "any-certified"\n').seeds == ()  # open without seeds: fine


def test_member_timeout_must_exceed_the_announce_interval() -> None:
    assert errors_with_mesh(member_timeout=30) == [
        "mesh.member_timeout: mesh.member_timeout (30) must be greater than mesh.announce_interval (30)"]
    assert errors_with_mesh(announce_interval=300) == [
        "mesh.announce_interval: mesh.member_timeout (120) must be greater than mesh.announce_interval (300)"]
    assert mesh_of(MINIMAL + "[mesh]\nannounce_interval = 5\nmember_timeout = 5.5\n").member_timeout == 5.5


def test_bad_values_do_not_also_report_the_cross_key_rules() -> None:
    assert errors_with_mesh(seeds=["nowhere"], member_timeout="x") == [
        'mesh.seeds[0]: invalid address "nowhere": no port (expected "HOST:PORT" or "[IPv6]:PORT")',
        'mesh.member_timeout: must be a number of seconds, > 0 and <= 86400, got "x"']


def test_a_drop_in_can_open_the_mesh(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text(MINIMAL)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-mesh.toml").write_text('[mesh]\nmembers = "any-certified"\nseeds = ["s:1"]\n')
    assert load_config(tmp_path / "node.toml", check_files=False).mesh.seeds == (Address("s", 1),)
    (tmp_path / "conf.d" / "60-mesh.toml").write_text('[mesh]\nconnect = "sometimes"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "node.toml", check_files=False)
    assert info.value.errors == [f'{tmp_path / "conf.d" / "60-mesh.toml"}: mesh.connect: must be one of full, '
                                 'on-demand, auto, got "sometimes"']


def test_check_config_reports_a_bad_mesh_key_in_one_line(tmp_path: Path) -> None:
    for name in ("ca.crt", "node.crt"):
        (tmp_path / name).write_text("-----BEGIN DUMMY-----\n")
    (tmp_path / "node.key").write_text("-----BEGIN DUMMY KEY-----\n")
    (tmp_path / "node.key").chmod(0o600)
    (tmp_path / "node.toml").write_text(MINIMAL + '[mesh]\nseeds = ["10.0.0.1:4433"]\n')
    result = subprocess.run([sys.executable, "-m", "quicmesh", "check-config", "-c", str(tmp_path / "node.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"quicmesh: error: {tmp_path / 'node.toml'}: mesh.seeds: mesh.seeds need")
