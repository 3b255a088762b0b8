"""The node config (docs/CONFIG.md): TOML -> frozen dataclasses, every error reported at once.

- :mod:`.model`: the resolved config (dataclasses; their defaults are the config's defaults) and its bounds;
- :mod:`.schema`: how each key is checked, value parsers such as :func:`parse_address`;
- :mod:`.parser`: :func:`load_config` and :func:`parse_config`;
- :mod:`.render`: :func:`render_config`, the resolved config as TOML.

Light on purpose (no cryptography, no aioquic): `quicmesh status -c node.toml` reads it to find the control socket.
"""

from __future__ import annotations

from quicmesh.config.model import (
    Address,
    Config,
    ControlSection,
    ForwardConfig,
    HealthSection,
    Limits,
    LogSection,
    MeshSection,
    NatSection,
    MetricsSection,
    NodeSection,
    PeerConfig,
    PubSubPeer,
    PubSubSection,
    RelaySection,
    SecuritySection,
    ServiceConfig,
    StorageSection,
    Timers,
    TlsSection,
)
from quicmesh.config.parser import drop_in_files, load_config, parse_config
from quicmesh.config.render import render_config
from quicmesh.config.schema import parse_address
from quicmesh.ops.socket_paths import MAX_SOCKET_PATH_BYTES
from quicmesh.protocol.fingerprints import normalize_fingerprint

__all__ = [
    "Address",
    "NodeSection",
    "TlsSection",
    "PeerConfig",
    "PubSubSection",
    "PubSubPeer",
    "Limits",
    "Timers",
    "ControlSection",
    "LogSection",
    "MeshSection",
    "NatSection",
    "SecuritySection",
    "MetricsSection",
    "HealthSection",
    "ServiceConfig",
    "StorageSection",
    "RelaySection",
    "ForwardConfig",
    "Config",
    "MAX_SOCKET_PATH_BYTES",
    "parse_address",
    "normalize_fingerprint",
    "load_config",
    "drop_in_files",
    "parse_config",
    "render_config",
]
