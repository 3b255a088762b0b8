"""quicmesh: a secure full mesh over QUIC with mutual TLS from a private CA."""

from __future__ import annotations

from .errors import *  # noqa: F401,F403  (the exception hierarchy is part of the public API)
from .errors import __all__ as _errors_all  # type: ignore[attr-defined]

__version__ = "0.1.0"
