"""conf.d/*.toml drop-ins: merged in name order (tables key by key, arrays of tables appended, other values
replaced), and each error names the file and the key path within it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quicmesh.config import drop_in_files, load_config
from quicmesh.config.parser import merge_layers
from quicmesh.errors import ConfigError
from tests.unit.test_config import MINIMAL, make_files, write_config

MAIN = MINIMAL + f"""\
denylist = ["sha256:{'aa' * 32}"]

[[peers]]
name = "beta"
address = "10.0.0.2:4433"

[timers]
keepalive = 0.5
"""


def setup(folder: Path, **drop_ins: str) -> Path:
    config = write_config(make_files(folder), MAIN)
    if drop_ins:
        (folder / "conf.d").mkdir()
    for name, text in drop_ins.items():
        (folder / "conf.d" / name.replace("_", "-")).write_text(text)
    return config


def test_merge_rules(tmp_path: Path) -> None:
    path = setup(tmp_path,
                 **{"20_peers.toml": '[[peers]]\nname = "gamma"\naddress = "10.0.0.3:4433"\n',
                    "10_timers.toml": "[timers]\ndead_after = 4.0\n[log]\nlevel = \"debug\"\n",
                    "30_deny.toml": f'[tls]\ndenylist = ["sha256:{"bb" * 32}"]\n[timers]\nkeepalive = 0.25\n'})
    config = load_config(path)
    assert [p.name for p in config.peers] == ["beta", "gamma"]  # arrays of tables append
    assert (config.timers.keepalive, config.timers.dead_after) == (0.25, 4.0)  # key by key, later wins
    assert config.tls.denylist == ("sha256:" + "bb" * 32,)  # a plain array is replaced whole
    assert config.tls.ca == tmp_path / "ca.crt"  # the rest of [tls] stays
    assert config.log.level == "debug"
    assert [p.name for p in drop_in_files(path)] == ["10-timers.toml", "20-peers.toml", "30-deny.toml"]


def test_only_toml_files_in_name_order(tmp_path: Path) -> None:
    path = setup(tmp_path, **{"b.toml": '[log]\nlevel = "error"\n', "a.toml": '[log]\nlevel = "debug"\n',
                              "c.toml.disabled": '[log]\nlevel = "nonsense"\n'})
    (tmp_path / "conf.d" / "d.toml").mkdir()  # a folder named like a drop-in is not one
    assert load_config(path).log.level == "error"


def test_errors_name_the_file_and_its_own_key_path(tmp_path: Path) -> None:
    path = setup(tmp_path, **{"10_a.toml": '[[peers]]\nname = "gamma"\naddress = "nowhere"\n',
                              "20_b.toml": '[[peers]]\nname = "beta"\naddress = "10.0.0.9:1"\n[timers]\nkepalive = 1\n'})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    drop_in = os.path.join(str(tmp_path), "conf.d")
    assert caught.value.source is None
    assert caught.value.errors == [
        f'{drop_in}/10-a.toml: peers[0].address: invalid address "nowhere": no port '
        '(expected "HOST:PORT" or "[IPv6]:PORT")',
        f"{drop_in}/20-b.toml: peers[0].name: duplicate peer 'beta' (also {path}: peers[0])",
        f"{drop_in}/20-b.toml: timers.kepalive: unknown key, did you mean 'keepalive'?",
    ]


def test_a_key_replaced_by_a_drop_in_is_blamed_on_it(tmp_path: Path) -> None:
    path = setup(tmp_path, **{"x.toml": "[timers]\nkeepalive = -1\n"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [
        f"{tmp_path}/conf.d/x.toml: timers.keepalive: must be a number of seconds, > 0 and <= 86400, got -1"]


def test_missing_keys_are_blamed_on_the_file_that_has_the_table(tmp_path: Path) -> None:
    path = setup(tmp_path, **{"x.toml": "[metrics]\n"})
    path.write_text(MAIN.replace('name = "alpha"\n', ""))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [f"{path}: node.name: missing required key"]


def test_bad_toml_in_a_drop_in_names_it(tmp_path: Path) -> None:
    path = setup(tmp_path, **{"bad.toml": "[timers\n"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == f"{tmp_path}/conf.d/bad.toml"
    assert caught.value.errors[0].startswith(f"invalid TOML in {tmp_path}/conf.d/bad.toml: ")


def test_without_drop_ins_errors_keep_the_single_source(tmp_path: Path) -> None:
    path = setup(tmp_path)
    path.write_text(MAIN + "[log]\nlevel = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.errors[0].startswith("log.level: must be one of")


def test_merge_layers_does_not_touch_its_inputs() -> None:
    first = {"peers": [{"name": "a"}], "timers": {"keepalive": 1}}
    second = {"peers": [{"name": "b"}], "timers": {"keepalive": 2}}
    merged, origins = merge_layers([("one", first), ("two", second)])
    assert merged == {"peers": [{"name": "a"}, {"name": "b"}], "timers": {"keepalive": 2}}
    assert first == {"peers": [{"name": "a"}], "timers": {"keepalive": 1}}
    assert origins["peers[1]"] == ("two", "peers[0]") and origins["timers.keepalive"] == ("two", "timers.keepalive")
