"""What "healthy" means for a node: the min-peers rule and its verdict, in monitoring-plugin terms.

One pure rule for every judge: `quicmesh status` turns the verdict into its exit code, the metrics
listener's /readyz into its answer. Light on purpose (no config, no node): the client commands import it.

A rule is ``N`` (at least N connected peers; all of them when fewer are configured) or ``P%`` (at least
P percent of the configured peers, rounded up). The default, ``100%``, is every configured peer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum

MAX_PEERS_RULE = 1_000_000  # "N" above this is a typo, not a mesh


class Verdict(IntEnum):
    """The monitoring-plugin states (Nagios, Icinga, Sensu); the value is the exit code."""

    OK = 0        # every configured peer is connected
    WARNING = 1   # some peer is down, but at least the required number are connected
    CRITICAL = 2  # fewer peers connected than required, or no node answers
    UNKNOWN = 3   # the state could not be judged: bad usage or an unusable config


@dataclass(frozen=True)
class MinPeers:
    """How many connected peers make a node ready: ``count`` peers, or ``percent`` of the configured ones."""

    count: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("MinPeers takes a count or a percent, not both or neither")

    def required(self, total: int) -> int:
        """Connected peers needed out of ``total`` configured (never more than ``total``)."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100 - 1e-9))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.percent:g}%"


ALL_PEERS = MinPeers(percent=100.0)


def parse_min_peers(text: str | int) -> MinPeers:
    """``3`` or ``"3"`` (peers), ``"75%"`` (of the configured peers); ValueError with a one-line reason."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f'min_peers must be a number of peers or a percentage like "75%", got {text!r}')
    if isinstance(text, int):
        if not 0 <= text <= MAX_PEERS_RULE:
            raise ValueError(f"min_peers must be between 0 and {MAX_PEERS_RULE} peers, got {text}")
        return MinPeers(count=text)
    given = text.strip()
    if re.fullmatch(r"[0-9]+", given):
        return parse_min_peers(int(given))
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*%", given)
    if match is None:
        raise ValueError(f'min_peers must be a number of peers (3) or a percentage (75%), got {text!r}')
    percent = float(match.group(1))
    if percent > 100:
        raise ValueError(f"min_peers must be at most 100%, got {text!r}")
    return MinPeers(percent=percent)


def verdict(connected: int, total: int, rule: MinPeers) -> Verdict:
    """OK when every peer is connected, WARNING while at least the required number are, else CRITICAL."""
    if connected >= total:
        return Verdict.OK
    return Verdict.WARNING if connected >= rule.required(total) else Verdict.CRITICAL
