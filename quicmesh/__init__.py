"""quicmesh: a secure full mesh over QUIC with mutual TLS from a private CA.

Unreliable datagrams, reliable messages (each on its own stream) and requests between the nodes of a
mesh; see docs/API.md.

The node and the config load on first use (PEP 562): `quicmesh status` and the other client commands
import this package without paying for aioquic and cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from quicmesh.errors import *  # noqa: F403  (the exception hierarchy is part of the public API)
from quicmesh.errors import __all__ as _errors_all

if TYPE_CHECKING:
    from quicmesh.config import Config, load_config
    from quicmesh.durable.feature import DurableReceived
    from quicmesh.pubsub.subscription import Subscription
    from quicmesh.runtime.node import Node, PeerEvent, PeerStatus, Received

__version__ = "0.1.0"
__all__ = ["Config", "DurableReceived", "Node", "PeerEvent", "PeerStatus", "Received", "Subscription", "load_config",
           *_errors_all]

_LAZY = {
    "Config": "quicmesh.config",
    "load_config": "quicmesh.config",
    "Node": "quicmesh.runtime.node",
    "PeerEvent": "quicmesh.runtime.node",
    "PeerStatus": "quicmesh.runtime.node",
    "Received": "quicmesh.runtime.node",
    "DurableReceived": "quicmesh.durable.feature",
    "Subscription": "quicmesh.pubsub.subscription",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'quicmesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
