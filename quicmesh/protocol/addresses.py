"""How quicmesh writes a UDP address for people: one formatter for logs, status, metrics, errors and config."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 host in brackets: the form config files use, so it parses back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(address: object) -> str:
    """``("::1", 4433)`` -> ``[::1]:4433``; an IPv4-mapped ``::ffff:10.0.0.1`` shows as ``10.0.0.1``;
    anything else (a string, a config ``Address``) as ``str()``; None or empty -> ``-``."""
    if not address:
        return "-"
    if not isinstance(address, tuple):
        return str(address)
    host, port = address[0], address[1]
    return host_port(host.removeprefix("::ffff:"), port)
