"""quicmesh.ops.health: the min-peers rule, its verdicts, and the [health] config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from quicmesh.config import parse_config, render_config
from quicmesh.errors import ConfigError
from quicmesh.ops.health import ALL_PEERS, MinPeers, Verdict, parse_min_peers, verdict

BASE = {"node": {"name": "alpha", "mesh": "prod", "listen": "127.0.0.1:4433"},
        "tls": {"ca": "ca.crt", "cert": "node.crt", "key": "node.key"}}


@pytest.mark.parametrize("text, total, required", [
    ("2", 5, 2), (2, 5, 2), (0, 5, 0), ("7", 5, 5), ("60%", 5, 3), ("50%", 5, 3), ("40%", 5, 2),
    ("100%", 5, 5), ("0%", 5, 0), ("33.3%", 3, 1), ("100%", 0, 0), (" 75 % ", 4, 3), ("97%", 30, 30),
])
def test_required(text: str | int, total: int, required: int) -> None:
    assert parse_min_peers(text).required(total) == required


@pytest.mark.parametrize("text, reason", [
    ("", "a number of peers (3) or a percentage (75%)"), ("-1", "a number of peers"), ("1.5", "a number"),
    ("101%", "at most 100%"), ("all", "a number"), (-2, "between 0 and"), (True, "got True"),
    (1.0, "got 1.0"), ("2000000", "between 0 and 1000000"), ("nan%", "a number"),
])
def test_bad_rules(text: object, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        parse_min_peers(text)  # type: ignore[arg-type]
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_verdicts() -> None:
    two = parse_min_peers("2")
    assert [verdict(c, 3, two) for c in (3, 2, 1, 0)] == [Verdict.OK, Verdict.WARNING, Verdict.CRITICAL,
                                                         Verdict.CRITICAL]
    assert [verdict(c, 3, ALL_PEERS) for c in (3, 2)] == [Verdict.OK, Verdict.CRITICAL]
    assert verdict(0, 0, ALL_PEERS) is Verdict.OK  # no peers configured: nothing is missing
    assert verdict(0, 4, parse_min_peers(0)) is Verdict.WARNING  # alive is enough, but say peers are down
    assert [int(v) for v in Verdict] == [0, 1, 2, 3]


def test_str_round_trips() -> None:
    for text in ("3", "75%", "33.5%", "100%"):
        assert parse_min_peers(str(parse_min_peers(text))) == parse_min_peers(text)
    with pytest.raises(ValueError):
        MinPeers()


def test_config_key(tmp_path: Path) -> None:
    default = parse_config(BASE, tmp_path, check_files=False)
    assert default.health.min_peers == ALL_PEERS
    config = parse_config({**BASE, "health": {"min_peers": "60%"}}, tmp_path, check_files=False)
    assert config.health.min_peers.required(5) == 3
    counted = parse_config({**BASE, "health": {"min_peers": 2}}, tmp_path, check_files=False)
    assert "[health]\nmin_peers = 2\n" in render_config(counted)
    assert "[health]\nmin_peers = \"60%\"\n" in render_config(config)
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "health": {"min_peers": "most", "min_peer": 1}}, tmp_path, check_files=False)
    assert caught.value.errors == [
        "health.min_peer: unknown key, did you mean 'min_peers'?",
        "health.min_peers: min_peers must be a number of peers (3) or a percentage (75%), got 'most'",
    ]
