"""The network-namespace tier: skipped with the reason when not root or without ip/iptables."""

from __future__ import annotations

from pathlib import Path

import pytest

from netns.topology import unavailable

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.fspath)).parents]
    reason = unavailable() if mine else None
    for item in mine:
        item.add_marker(pytest.mark.netns)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
