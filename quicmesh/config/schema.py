"""The config schema: how each key is checked and converted, and which table maps onto which dataclass.

A check takes the raw TOML value (and the parser, for the config folder) and returns the converted value or
raises ValueError with a message a human can act on; ItemErrors reports several bad items of one array.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quicmesh.config.model import (
    MAX_DATAGRAM_QUEUE,
    MAX_FLOWS_PER_PEER,
    MAX_MESSAGE_SIZE,
    MAX_MESSAGE_WINDOW,
    MAX_SECONDS,
    Address,
    ControlSection,
    ForwardConfig,
    HealthSection,
    Limits,
    LogSection,
    MeshSection,
    MetricsSection,
    NatSection,
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
from quicmesh.errors import InvalidNameError
from quicmesh.ops.health import MinPeers, parse_min_peers
from quicmesh.ops.logs import FORMATS, LEVELS
from quicmesh.ops.socket_paths import MAX_SOCKET_PATH_BYTES, socket_path_fits
from quicmesh.protocol.fingerprints import normalize_fingerprint
from quicmesh.protocol.names import validate_name
from quicmesh.protocol.text import show

if TYPE_CHECKING:
    from quicmesh.config.parser import Parser


# --- value parsers (public: the CLI and PKI tool parse the same forms) ---------------------------
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ZONE_ID = re.compile(r"[A-Za-z0-9_.-]+")
_ADDRESS_FORMS = 'expected "HOST:PORT" or "[IPv6]:PORT"'


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse "HOST:PORT" or "[v6addr]:PORT"; ValueError with a message a human can act on."""
    if not isinstance(text, str):
        raise ValueError(f'must be an address string like "HOST:PORT", got {show(text)}')

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid address {show(text)}: {reason}")

    if not text:
        raise bad(f"it is empty ({_ADDRESS_FORMS})")
    if any(c.isspace() for c in text):
        raise bad("it contains whitespace")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise bad('expected "[IPv6]:PORT"')
        port = rest[1:]
        _check_ipv6(host, bad)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise bad(f"no port ({_ADDRESS_FORMS})")
        if ":" in host:
            raise bad(f'an IPv6 address needs brackets: "[{host}]:{port}"')
        _check_host(host, bad)
    if not re.fullmatch(r"[0-9]{1,5}", port):
        raise bad(f"port {port!r} is not a number" if port else "the port is missing")
    low = 0 if allow_port_zero else 1
    if not low <= int(port) <= 65535:
        raise bad(f"port {int(port)} is out of range ({low}..65535)")
    return Address(host, int(port))


def _check_ipv6(host: str, bad: Callable[[str], ValueError]) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise bad(f"{host!r} is not an IPv6 address") from None
    # The zone id ("%eth0") may hold anything for ipaddress; keep it to interface-name characters.
    if "%" in host and not _ZONE_ID.fullmatch(host.partition("%")[2]):
        raise bad(f"{host!r} has an invalid zone id")


def _check_host(host: str, bad: Callable[[str], ValueError]) -> None:
    if not host:
        raise bad("the host is missing")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad(f"{host!r} is not a valid IPv4 address") from None
    elif len(host) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in host.removesuffix(".").split(".")):
        raise bad(f"{host!r} is not a valid host name or IP address")


def did_you_mean(word: object, candidates: list[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word.lower(), candidates, n=1)
    return f", did you mean {close[0]!r}?" if close else ""


# --- the schema -------------------------------------------------------------------------------------
class ItemErrors(ValueError):
    """Raised by a check of an array: one message per bad item, as (index suffix, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


Check = Callable[[Any, "Parser"], Any]  # returns the converted value or raises ValueError(message)


@dataclass(frozen=True)
class Field:
    key: str
    check: Check
    required: bool = False  # an optional key left out takes the dataclass default


@dataclass(frozen=True)
class Table:
    """How one TOML table maps onto one of the dataclasses above."""

    cls: type
    fields: tuple[Field, ...]

    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.fields]


def _integer(low: int, high: int) -> Check:
    def check(value: Any, _: Parser) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ValueError(f"must be an integer between {low} and {high}, got {show(value)}")

    return check


def _seconds(value: Any, _: Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds, > 0 and <= {MAX_SECONDS:g}, got {show(value)}")
    return float(value)


def _choice(*options: str) -> Check:
    def check(value: Any, _: Parser) -> str:
        if isinstance(value, str) and value in options:
            return value
        hint = did_you_mean(value, list(options))
        raise ValueError(f"must be one of {', '.join(options)}, got {show(value)}{hint}")

    return check


def _name(kind: str) -> Check:
    def check(value: Any, _: Parser) -> str:
        try:
            return validate_name(value, kind)
        except InvalidNameError as e:
            raise ValueError(str(e)) from None

    return check


def _address(*, allow_port_zero: bool = False) -> Check:
    return lambda value, _: parse_address(value, allow_port_zero=allow_port_zero)


def _fingerprint(value: Any, _: Parser) -> str:
    return normalize_fingerprint(value)


def _fingerprints(value: Any, _: Parser) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of fingerprints ("sha256:<hex>"), got {show(value)}')
    normalized, problems = [], []
    for i, item in enumerate(value):
        try:
            normalized.append(normalize_fingerprint(item))
        except ValueError as e:
            problems.append((f"[{i}]", str(e)))
    if problems:
        raise ItemErrors(problems)
    return tuple(normalized)


def _path(value: Any, parser: Parser) -> Path:
    """Relative to the config file's folder, '~' expanded; not normalized, so '..' keeps OS meaning."""
    if not isinstance(value, str):
        raise ValueError(f"must be a path string, got {show(value)}")
    if not value:
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"is not valid Unicode text: {show(value)}") from None
    return parser.base_dir / os.path.expanduser(value)


def _file(*, private: bool = False) -> Check:
    """A path to a file the node reads; with check_files, it must be there (and private if a key)."""

    def check(value: Any, parser: Parser) -> Path:
        path = _path(value, parser)
        if parser.check_files:
            _check_file(path, private)
        return path

    return check


def _check_file(path: Path, private: bool) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot access {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"not readable by this user: {path}")
    if private and info.st_mode & 0o077:
        raise ValueError(
            f"{path} is accessible by group/others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod 600 {shlex.quote(str(path))}"
        )


def _socket(value: Any, parser: Parser) -> Path:
    path = _path(value, parser)
    if not socket_path_fits(path):
        raise ValueError(
            f"{path} is too long for a Unix socket (at most {MAX_SOCKET_PATH_BYTES} bytes); "
            "choose a shorter path, e.g. under /run or /tmp"
        )
    return path


_NODE = Table(NodeSection, (
    Field("name", _name("node"), required=True),
    Field("mesh", _name("mesh"), required=True),
    Field("listen", _address(allow_port_zero=True), required=True),
))
_TLS = Table(TlsSection, (
    Field("ca", _file(), required=True),
    Field("cert", _file(), required=True),
    Field("key", _file(private=True), required=True),
    Field("crl", _file()),
    Field("denylist", _fingerprints),
))
_PEER = Table(PeerConfig, (
    Field("name", _name("peer"), required=True),
    Field("address", _address(), required=True),
    Field("fingerprint", _fingerprint),
))
_LIMITS = Table(Limits, (
    Field("max_datagram_size", _integer(1200, 65527)),
    Field("max_message_size", _integer(1, MAX_MESSAGE_SIZE)),
    Field("datagram_queue", _integer(1, MAX_DATAGRAM_QUEUE)),
    Field("message_window", _integer(1, MAX_MESSAGE_WINDOW)),
    Field("max_requests_in_flight", _integer(1, 100)),
    Field("max_peer_buffer", _integer(2, 2 * MAX_MESSAGE_SIZE)),
    Field("max_inbox_bytes", _integer(1, 1 << 40)),
    Field("max_flows_per_peer", _integer(1, MAX_FLOWS_PER_PEER)),
    Field("forward_idle_timeout", _seconds),
))
_TIMERS = Table(Timers, tuple(Field(f.name, _seconds) for f in dataclasses.fields(Timers)))
_CONTROL = Table(ControlSection, (Field("socket", _socket),))  # default needs the node name
_LOG = Table(LogSection, (Field("level", _choice(*LEVELS)), Field("format", _choice(*FORMATS))))


def _boolean(value: Any, _: Parser) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {show(value)}")


def _rate(value: Any, _: Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1_000_000:
        raise ValueError(f"must be a number per second between 0 (no limit) and 1000000, got {show(value)}")
    return float(value)


def _cidrs(value: Any, _: Parser) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of CIDRs, e.g. ["10.0.0.0/8", "2001:db8::/32"], got {show(value)}')
    networks, problems = [], []
    for i, item in enumerate(value):
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=False)) if isinstance(item, str)
                            else ipaddress.ip_network(""))
        except ValueError:
            problems.append((f"[{i}]", f"must be an IP address or CIDR network such as \"10.0.0.0/8\", got {show(item)}"))
    if problems:
        raise ItemErrors(problems)
    return tuple(networks)


_SECURITY = Table(SecuritySection, (
    Field("allowlist", _cidrs),
    Field("allowlist_peers", _boolean),
    Field("retry", _boolean),
    Field("handshake_rate_per_source", _rate),
    Field("handshake_burst_per_source", _integer(1, 1_000_000)),
    Field("handshake_rate", _rate),
    Field("handshake_burst", _integer(1, 1_000_000)),
    Field("max_pending_handshakes", _integer(0, 1_000_000)),
))
_METRICS = Table(MetricsSection, (Field("listen", _address(allow_port_zero=True)),))


def _min_peers(value: Any, _: Parser) -> MinPeers:
    return parse_min_peers(value)


_HEALTH = Table(HealthSection, (Field("min_peers", _min_peers),))

MAX_TTL = 365 * 86_400.0  # a durable message's time to live: up to a year


def _ttl(value: Any, _: Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TTL:
        raise ValueError(f"must be a number of seconds, > 0 and <= {MAX_TTL:g} (a year), got {show(value)}")
    return float(value)


_STORAGE = Table(StorageSection, (
    Field("path", _path),
    Field("sync", _choice("normal", "full")),
    Field("max_messages", _integer(1, 1 << 40)),
    Field("max_bytes", _integer(1, 1 << 50)),
    Field("max_peer_messages", _integer(1, 1 << 40)),
    Field("max_peer_bytes", _integer(1, 1 << 50)),
    Field("ttl", _ttl),
))


def _peer_names(value: Any, parser: Parser) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of peer names, e.g. ["beta"], got {show(value)}')
    names, problems = [], []
    for i, item in enumerate(value):
        try:
            name = validate_name(item, "peer")
        except InvalidNameError as e:
            problems.append((f"[{i}]", str(e)))
            continue
        if name in names:
            problems.append((f"[{i}]", f"duplicate peer {name!r}"))
        names.append(name)
    if problems:
        raise ItemErrors(problems)
    return tuple(names)


def _bytes_per_second(value: Any, _: Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e12:
        raise ValueError(f"must be a number of bytes per second between 0 (no limit) and 1e12, got {show(value)}")
    return float(value)


_NAT = Table(NatSection, (
    Field("punch", _boolean),
    Field("rendezvous", _boolean),
    Field("dial_private", _boolean),
    Field("punch_rate", _rate),
    Field("punch_burst", _integer(1, 1_000)),
))
_RELAY = Table(RelaySection, (
    Field("serve", _boolean),
    Field("use", _boolean),
    Field("allow", _peer_names),
    Field("max_circuits", _integer(0, 100_000)),
    Field("max_circuits_per_peer", _integer(0, 100_000)),
    Field("max_bytes_per_second", _bytes_per_second),
))
def _subject_patterns(value: Any, _: Parser) -> tuple[str, ...]:
    from quicmesh.pubsub.subjects import validate_pattern  # pure; only here, so the schema loads it lazily
    from quicmesh.errors import InvalidSubjectError

    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of subject patterns, e.g. ["orders.>"], got {show(value)}')
    patterns, problems = [], []
    for i, item in enumerate(value):
        try:
            patterns.append(validate_pattern(item))
        except InvalidSubjectError as e:
            problems.append((f"[{i}]", str(e)))
    if problems:
        raise ItemErrors(problems)
    return tuple(patterns)


_PUBSUB_PEER = Table(PubSubPeer, (
    Field("name", _name("peer"), required=True),
    Field("publish", _subject_patterns),
    Field("subscribe", _subject_patterns),
))


def _pubsub_peers(value: Any, parser: Parser) -> tuple[PubSubPeer, ...]:
    """``[[pubsub.peers]]`` tables; each bad key is reported by its own path."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be an array of tables ([[pubsub.peers]] with name, publish, subscribe), got {show(value)}")
    entries: list[PubSubPeer] = []
    for i, item in enumerate(value):
        values, valid = parser.table(item, f"pubsub.peers[{i}]", _PUBSUB_PEER)
        if not valid:
            continue
        if any(entry.name == values["name"] for entry in entries):
            parser.fail(f"pubsub.peers[{i}].name", f"duplicate peer {values['name']!r}")
            continue
        entries.append(PubSubPeer(**values))
    return tuple(entries)


_PUBSUB = Table(PubSubSection, (
    Field("publish", _subject_patterns),
    Field("subscribe", _subject_patterns),
    Field("peers", _pubsub_peers),
    Field("max_interest_per_peer", _integer(1, 1_000_000)),
    Field("interest_rate", _rate),
    Field("interest_burst", _integer(1, 1_000_000)),
    Field("max_pending", _integer(1, 1_000_000)),
))
MESH_MEMBERS = ("configured", "any-certified")
MESH_CONNECT = ("full", "on-demand", "auto")
MAX_ADVERTISED = 8  # addresses in one signed announcement (docs/MEMBERSHIP.md)
MAX_SEEDS = 64


def _addresses(limit: int, *, what: str, wildcard: bool) -> Check:
    """An array of "HOST:PORT" (as [[peers]] address), at most ``limit``, no duplicates; ``wildcard``: whether
    0.0.0.0 / [::] make sense (a seed or an advertised address is dialed, so they do not)."""

    def check(value: Any, _: Parser) -> tuple[Address, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'must be an array of {what} addresses, e.g. ["10.0.0.1:4433"], got {show(value)}')
        if len(value) > limit:
            raise ValueError(f"at most {limit} {what} addresses, got {len(value)}")
        addresses: list[Address] = []
        problems = []
        for i, item in enumerate(value):
            try:
                address = parse_address(item)
            except ValueError as e:
                problems.append((f"[{i}]", str(e)))
                continue
            if not wildcard and _is_wildcard(address.host):
                problems.append((f"[{i}]", f"{address} is a wildcard address: give one other nodes can dial"))
            elif address in addresses:
                problems.append((f"[{i}]", f"duplicate {what} address {address}"))
            addresses.append(address)
        if problems:
            raise ItemErrors(problems)
        return tuple(addresses)

    return check


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _positive_rate(value: Any, _: Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1_000_000:
        raise ValueError(f"must be a number per second, > 0 and <= 1000000, got {show(value)}")
    return float(value)


_MESH = Table(MeshSection, (
    Field("members", _choice(*MESH_MEMBERS)),
    Field("seeds", _addresses(MAX_SEEDS, what="seed", wildcard=False)),
    Field("advertise", _addresses(MAX_ADVERTISED, what="advertised", wildcard=False)),
    Field("connect", _choice(*MESH_CONNECT)),
    Field("full_mesh_max", _integer(1, 1_000_000)),
    Field("neighbors", _integer(1, 1_000)),
    Field("idle_close", _seconds),
    Field("announce_interval", _seconds),
    Field("member_timeout", _seconds),
    Field("gossip_interval", _seconds),
    Field("max_members", _integer(2, 1_000_000)),
    Field("announce_rate", _positive_rate),
    Field("announce_burst", _integer(1, 1_000_000)),
))
_SERVICE = Table(ServiceConfig, (
    Field("name", _name("service"), required=True),
    Field("target", _address(), required=True),
    Field("allow", _peer_names),
))
_FORWARD = Table(ForwardConfig, (
    Field("listen", _address(allow_port_zero=True), required=True),
    Field("peer", _name("peer"), required=True),
    Field("service", _name("service"), required=True),
))

# Config's sections, in file order; "peers", "services" and "forwards" are arrays of tables.
SECTIONS: dict[str, Table] = {
    "node": _NODE, "tls": _TLS, "peers": _PEER, "limits": _LIMITS,
    "timers": _TIMERS, "control": _CONTROL, "log": _LOG, "security": _SECURITY, "metrics": _METRICS,
    "health": _HEALTH, "storage": _STORAGE, "relay": _RELAY,
    "pubsub": _PUBSUB, "mesh": _MESH, "nat": _NAT,
    "services": _SERVICE, "forwards": _FORWARD,
}
ARRAY_SECTIONS = ("peers", "services", "forwards")
REQUIRED_SECTIONS = ("node", "tls")
# (low, high, strict): timers that must stay ordered.
TIMER_ORDER = (("keepalive", "dead_after", True), ("backoff_min", "backoff_max", False))


def header(section: str) -> str:
    return f"[[{section}]]" if section in ARRAY_SECTIONS else f"[{section}]"
