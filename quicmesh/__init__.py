"""quicmesh: a secure full mesh over QUIC with mutual TLS from a private CA.

Unreliable datagrams, reliable messages (each on its own stream) and requests between the nodes of a
mesh; see docs/API.md.
"""

from __future__ import annotations

from quicmesh.config import Config, load_config
from quicmesh.errors import *  # noqa: F403  (the exception hierarchy is part of the public API)
from quicmesh.errors import __all__ as _errors_all
from quicmesh.runtime.node import Node, PeerEvent, PeerStatus, Received

__version__ = "0.1.0"
__all__ = ["Config", "Node", "PeerEvent", "PeerStatus", "Received", "load_config", *_errors_all]
