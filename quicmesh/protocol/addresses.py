"""How quicmesh writes a UDP address for people: one formatter for logs, status, metrics and errors."""

from __future__ import annotations

from typing import Any


def format_address(address: Any) -> str:
    """``("::1", 4433)`` -> ``[::1]:4433``; an IPv4-mapped ``::ffff:10.0.0.1`` shows as ``10.0.0.1``;
    anything else (a string, a config ``Address``) as ``str()``; None or empty -> ``-``."""
    if not address:
        return "-"
    if not isinstance(address, tuple):
        return str(address)
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
