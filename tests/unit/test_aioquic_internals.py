"""Regression guard for quicmesh/_aioquic.py: fails loudly when an aioquic upgrade moves what it relies on.

The behaviour behind these hooks (client certificate requested, empty one refused, chain and identity
checked on both sides) is exercised end to end by tests/test_rejections.py.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from aioquic import tls

from quicmesh.transport._aioquic import check_internals


def test_every_private_aioquic_attribute_used_still_exists() -> None:
    assert check_internals() == []


def test_server_context_does_not_request_client_certificates_by_default() -> None:
    # If aioquic ever starts doing this itself, the hook (and its tests) must be revisited.
    assert tls.Context(is_client=False)._request_client_certificate is False


def test_installed_aioquic_is_inside_the_pinned_range() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pin = next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("aioquic"))
    installed = tuple(int(part) for part in version("aioquic").split(".")[:2])
    assert pin == "aioquic>=1.7.2,<1.8" and installed == (1, 7), (pin, installed)
