"""The node config (docs/CONFIG.md): TOML -> frozen dataclasses, every error reported at once.

Pure on purpose: besides reading the config file it only stats the files it names. Certificates are
parsed by quicmesh.protocol.identity, sockets opened by the node. Each section is described by a small table
(key, check, required); defaults live in the dataclasses, so the schema cannot disagree with them.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import ipaddress
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quicmesh.errors import ConfigError, InvalidNameError
from quicmesh.protocol.names import validate_name

__all__ = [
    "Address",
    "NodeSection",
    "TlsSection",
    "PeerConfig",
    "Limits",
    "Timers",
    "ControlSection",
    "LogSection",
    "SecuritySection",
    "MetricsSection",
    "ServiceConfig",
    "ForwardConfig",
    "Config",
    "parse_address",
    "normalize_fingerprint",
    "load_config",
    "parse_config",
    "render_config",
]

# aioquic allows 128 concurrent streams per direction; the transport keeps a few for control/requests.
MAX_MESSAGE_WINDOW = 120
MAX_MESSAGE_SIZE = 1 << 30
# Upper bounds that are not in the doc's prose but keep absurd values from overflowing downstream
# (deque maxlen, QUIC varint of the idle timeout in ms).
MAX_DATAGRAM_QUEUE = 1_000_000
MAX_SECONDS = 86_400.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
DEFAULT_SOCKET_NAME = "quicmesh.sock"
#: Forwarded UDP services a node may expose (ids must fit the wire's Services frame).
MAX_SERVICES = 512
MAX_FLOWS_PER_PEER = 16_384  # flow ids are below 2**14 on the wire
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


# --- the resolved config ------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """A UDP endpoint as written; a DNS host name stays a name, resolved at each dial (not here)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeSection:
    name: str
    mesh: str
    listen: Address


@dataclass(frozen=True)
class TlsSection:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None
    denylist: tuple[str, ...] = ()  # normalized "sha256:<64 lower-case hex>"


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: Address
    fingerprint: str | None = None  # normalized pin, like TlsSection.denylist


@dataclass(frozen=True)
class Limits:
    max_datagram_size: int = 1200
    max_message_size: int = 16 * 1024 * 1024
    datagram_queue: int = 1024
    message_window: int = 64
    max_requests_in_flight: int = 64
    # Bytes one peer may have buffered here: its partly received messages plus those held unacknowledged
    # while the application is behind (over it: connection closed, RESOURCE_LIMIT); the same bound caps
    # partly received requests (over it: that request refused, OVERLOADED). Senders keep at most half
    # of it unacknowledged, so a peer with the same setting never trips it.
    max_peer_buffer: int = 64 * 1024 * 1024
    max_inbox_bytes: int = 64 * 1024 * 1024  # received, not yet read by the application (node-wide)
    max_flows_per_peer: int = 256  # forwarded UDP flows per peer, each way (new flows over it are dropped)
    forward_idle_timeout: float = 60.0  # seconds without traffic before a forwarded UDP flow is closed


@dataclass(frozen=True)
class Timers:
    """All in seconds."""

    keepalive: float = 1.0
    dead_after: float = 3.0
    backoff_min: float = 0.2
    backoff_max: float = 10.0
    handshake_timeout: float = 5.0


@dataclass(frozen=True)
class ControlSection:
    socket: Path


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class SecuritySection:
    """Strangers (quicmesh/guard.py): source allowlist, handshake rate limits, pending cap, QUIC Retry."""

    allowlist: tuple[str, ...] | None = None  # CIDRs; None (key left out): no allowlist unless allowlist_peers
    allowlist_peers: bool = False  # also allow the configured peers' (resolved) addresses
    retry: bool = False  # QUIC Retry address validation (+1 round trip per handshake)
    handshake_rate_per_source: float = 20.0  # new handshakes per second from one IP address (0: no limit)
    handshake_burst_per_source: int = 50
    handshake_rate: float = 200.0  # new handshakes per second, node-wide (0: no limit)
    handshake_burst: int = 400
    max_pending_handshakes: int = 256  # handshakes in progress at once (0: no limit)


@dataclass(frozen=True)
class MetricsSection:
    listen: Address | None = None  # Prometheus text endpoint, e.g. "127.0.0.1:9464"; None: off


@dataclass(frozen=True)
class ServiceConfig:
    """A local UDP service this node exposes to its peers, by name (docs/FORWARDING.md)."""

    name: str
    target: Address  # where datagrams of the service go: the only addresses forwarding ever sends to
    allow: tuple[str, ...] | None = None  # peers that may use it; None (key left out): every peer


@dataclass(frozen=True)
class ForwardConfig:
    """A local UDP port whose datagrams go to ``service`` on ``peer``."""

    listen: Address
    peer: str
    service: str


@dataclass(frozen=True)
class Config:
    """A node's whole config, validated and resolved: what the node, the CLI and reloads work from."""

    node: NodeSection
    tls: TlsSection
    peers: tuple[PeerConfig, ...]
    limits: Limits
    timers: Timers
    control: ControlSection
    log: LogSection
    security: SecuritySection = SecuritySection()
    metrics: MetricsSection = MetricsSection()
    services: tuple[ServiceConfig, ...] = ()
    forwards: tuple[ForwardConfig, ...] = ()
    path: Path | None = None  # the file it was loaded from; not a config key

    def peer(self, name: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Resolved values as plain data; unset optional keys are left out (TOML has no null)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "path"}


def _plain(value: Any) -> Any:
    if isinstance(value, (Path, Address)):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        pairs = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {k: _plain(v) for k, v in pairs if v is not None}
    return value


# --- value parsers (public: the CLI and PKI tool parse the same forms) ---------------------------
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ZONE_ID = re.compile(r"[A-Za-z0-9_.-]+")
_ADDRESS_FORMS = 'expected "HOST:PORT" or "[IPv6]:PORT"'


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse "HOST:PORT" or "[v6addr]:PORT"; ValueError with a message a human can act on."""
    if not isinstance(text, str):
        raise ValueError(f'must be an address string like "HOST:PORT", got {_show(text)}')

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid address {_show(text)}: {reason}")

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


_FINGERPRINT_FORM = '"sha256:" followed by 64 hex digits (colons between bytes allowed)'


def normalize_fingerprint(text: object) -> str:
    """Return "sha256:<64 lower-case hex>"; accepts any case and openssl's colon-separated form."""
    if not isinstance(text, str):
        raise ValueError(f"a fingerprint must be a string ({_FINGERPRINT_FORM}), got {_show(text)}")
    scheme, sep, digits = text.partition(":")
    digits = digits.replace(":", "").lower()
    if sep and scheme.lower() == "sha256" and re.fullmatch(r"[0-9a-f]{64}", digits):
        return "sha256:" + digits
    hint = ""
    if re.fullmatch(r"[0-9a-f]{64}", text.replace(":", "").lower()):
        hint = "; add the 'sha256:' prefix"
    raise ValueError(f"invalid fingerprint {_show(text)}: expected {_FINGERPRINT_FORM}{hint}")


# --- showing values in messages and in TOML -------------------------------------------------------
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    def escape(c: str) -> str:
        if c in _ESCAPES:
            return _ESCAPES[c]
        return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c

    return '"' + "".join(escape(c) for c in text) + '"'


def _show(value: object) -> str:
    """A bad value as the user wrote it in TOML, or its kind when that would not help."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return f"a {type(value).__name__}"


def _did_you_mean(word: object, candidates: list[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word.lower(), candidates, n=1)
    return f", did you mean {close[0]!r}?" if close else ""


def _key(prefix: str, key: object) -> str:
    text = key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key) else _show(key)
    return f"{prefix}.{text}" if prefix else text


# --- the schema -------------------------------------------------------------------------------------
class _ItemErrors(ValueError):
    """Raised by a check of an array: one message per bad item, as (index suffix, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


_Check = Callable[[Any, "_Parser"], Any]  # returns the converted value or raises ValueError(message)


@dataclass(frozen=True)
class _Field:
    key: str
    check: _Check
    required: bool = False  # an optional key left out takes the dataclass default


@dataclass(frozen=True)
class _Table:
    """How one TOML table maps onto one of the dataclasses above."""

    cls: type
    fields: tuple[_Field, ...]

    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.fields]


def _integer(low: int, high: int) -> _Check:
    def check(value: Any, _: _Parser) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ValueError(f"must be an integer between {low} and {high}, got {_show(value)}")

    return check


def _seconds(value: Any, _: _Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds, > 0 and <= {MAX_SECONDS:g}, got {_show(value)}")
    return float(value)


def _choice(*options: str) -> _Check:
    def check(value: Any, _: _Parser) -> str:
        if isinstance(value, str) and value in options:
            return value
        hint = _did_you_mean(value, list(options))
        raise ValueError(f"must be one of {', '.join(options)}, got {_show(value)}{hint}")

    return check


def _name(kind: str) -> _Check:
    def check(value: Any, _: _Parser) -> str:
        try:
            return validate_name(value, kind)
        except InvalidNameError as e:
            raise ValueError(str(e)) from None

    return check


def _address(*, allow_port_zero: bool = False) -> _Check:
    return lambda value, _: parse_address(value, allow_port_zero=allow_port_zero)


def _fingerprint(value: Any, _: _Parser) -> str:
    return normalize_fingerprint(value)


def _fingerprints(value: Any, _: _Parser) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of fingerprints ("sha256:<hex>"), got {_show(value)}')
    normalized, problems = [], []
    for i, item in enumerate(value):
        try:
            normalized.append(normalize_fingerprint(item))
        except ValueError as e:
            problems.append((f"[{i}]", str(e)))
    if problems:
        raise _ItemErrors(problems)
    return tuple(normalized)


def _path(value: Any, parser: _Parser) -> Path:
    """Relative to the config file's folder, '~' expanded; not normalized, so '..' keeps OS meaning."""
    if not isinstance(value, str):
        raise ValueError(f"must be a path string, got {_show(value)}")
    if not value:
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"is not valid Unicode text: {_show(value)}") from None
    return parser.base_dir / os.path.expanduser(value)


def _file(*, private: bool = False) -> _Check:
    """A path to a file the node reads; with check_files, it must be there (and private if a key)."""

    def check(value: Any, parser: _Parser) -> Path:
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


def _socket_path_fits(path: Path) -> bool:
    return len(str(path).encode("utf-8", "surrogateescape")) <= MAX_SOCKET_PATH_BYTES


def _socket(value: Any, parser: _Parser) -> Path:
    path = _path(value, parser)
    if not _socket_path_fits(path):
        raise ValueError(
            f"{path} is too long for a Unix socket (at most {MAX_SOCKET_PATH_BYTES} bytes); "
            "choose a shorter path, e.g. under /run or /tmp"
        )
    return path


def _default_socket_path(base_dir: Path, node: str) -> Path:
    """<config dir>/quicmesh.sock, or, if that is too long for a Unix socket, a short path that
    `quicmesh run` and `quicmesh status` derive alike from the config folder and the node name."""
    path = base_dir / DEFAULT_SOCKET_NAME
    if _socket_path_fits(path):
        return path
    digest = hashlib.sha256(str(base_dir).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    name = f"quicmesh-{node}-{digest}.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime_dir) and _socket_path_fits(Path(runtime_dir, name)):
        return Path(runtime_dir, name)
    return Path("/tmp", name)  # at most 14 + 63 + 22 bytes: always fits


_NODE = _Table(NodeSection, (
    _Field("name", _name("node"), required=True),
    _Field("mesh", _name("mesh"), required=True),
    _Field("listen", _address(allow_port_zero=True), required=True),
))
_TLS = _Table(TlsSection, (
    _Field("ca", _file(), required=True),
    _Field("cert", _file(), required=True),
    _Field("key", _file(private=True), required=True),
    _Field("crl", _file()),
    _Field("denylist", _fingerprints),
))
_PEER = _Table(PeerConfig, (
    _Field("name", _name("peer"), required=True),
    _Field("address", _address(), required=True),
    _Field("fingerprint", _fingerprint),
))
_LIMITS = _Table(Limits, (
    _Field("max_datagram_size", _integer(1200, 65527)),
    _Field("max_message_size", _integer(1, MAX_MESSAGE_SIZE)),
    _Field("datagram_queue", _integer(1, MAX_DATAGRAM_QUEUE)),
    _Field("message_window", _integer(1, MAX_MESSAGE_WINDOW)),
    _Field("max_requests_in_flight", _integer(1, 100)),
    _Field("max_peer_buffer", _integer(2, 2 * MAX_MESSAGE_SIZE)),
    _Field("max_inbox_bytes", _integer(1, 1 << 40)),
    _Field("max_flows_per_peer", _integer(1, MAX_FLOWS_PER_PEER)),
    _Field("forward_idle_timeout", _seconds),
))
_TIMERS = _Table(Timers, tuple(_Field(f.name, _seconds) for f in dataclasses.fields(Timers)))
_CONTROL = _Table(ControlSection, (_Field("socket", _socket),))  # default needs the node name
_LOG = _Table(LogSection, (_Field("level", _choice(*LOG_LEVELS)), _Field("format", _choice(*LOG_FORMATS))))


def _boolean(value: Any, _: _Parser) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {_show(value)}")


def _rate(value: Any, _: _Parser) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1_000_000:
        raise ValueError(f"must be a number per second between 0 (no limit) and 1000000, got {_show(value)}")
    return float(value)


def _cidrs(value: Any, _: _Parser) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of CIDRs, e.g. ["10.0.0.0/8", "2001:db8::/32"], got {_show(value)}')
    networks, problems = [], []
    for i, item in enumerate(value):
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=False)) if isinstance(item, str)
                            else ipaddress.ip_network(""))
        except ValueError:
            problems.append((f"[{i}]", f"must be an IP address or CIDR network such as \"10.0.0.0/8\", got {_show(item)}"))
    if problems:
        raise _ItemErrors(problems)
    return tuple(networks)


_SECURITY = _Table(SecuritySection, (
    _Field("allowlist", _cidrs),
    _Field("allowlist_peers", _boolean),
    _Field("retry", _boolean),
    _Field("handshake_rate_per_source", _rate),
    _Field("handshake_burst_per_source", _integer(1, 1_000_000)),
    _Field("handshake_rate", _rate),
    _Field("handshake_burst", _integer(1, 1_000_000)),
    _Field("max_pending_handshakes", _integer(0, 1_000_000)),
))
_METRICS = _Table(MetricsSection, (_Field("listen", _address(allow_port_zero=True)),))


def _peer_names(value: Any, parser: _Parser) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be an array of peer names, e.g. ["beta"], got {_show(value)}')
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
        raise _ItemErrors(problems)
    return tuple(names)


_SERVICE = _Table(ServiceConfig, (
    _Field("name", _name("service"), required=True),
    _Field("target", _address(), required=True),
    _Field("allow", _peer_names),
))
_FORWARD = _Table(ForwardConfig, (
    _Field("listen", _address(allow_port_zero=True), required=True),
    _Field("peer", _name("peer"), required=True),
    _Field("service", _name("service"), required=True),
))

# Config's sections, in file order; "peers", "services" and "forwards" are arrays of tables.
_SECTIONS: dict[str, _Table] = {
    "node": _NODE, "tls": _TLS, "peers": _PEER, "limits": _LIMITS,
    "timers": _TIMERS, "control": _CONTROL, "log": _LOG, "security": _SECURITY, "metrics": _METRICS,
    "services": _SERVICE, "forwards": _FORWARD,
}
_ARRAYS = ("peers", "services", "forwards")
_REQUIRED_SECTIONS = ("node", "tls")
# (low, high, strict): timers that must stay ordered.
_TIMER_ORDER = (("keepalive", "dead_after", True), ("backoff_min", "backoff_max", False))


class _Parser:
    """Walks the data against the schema, collecting every error instead of stopping at the first."""

    def __init__(self, base_dir: Path, check_files: bool) -> None:
        self.base_dir = base_dir
        self.check_files = check_files
        self.errors: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def unknown_keys(self, data: Mapping[Any, Any], prefix: str, known: list[str]) -> None:
        what = "key" if prefix else "section"
        for key in data:
            if key in known:
                continue
            hint = _did_you_mean(key, known) or f" (known {what}s: {', '.join(known)})"
            if not prefix:  # a key written above every [section], most likely
                owners = [_header(s) for s, table in _SECTIONS.items() if key in table.keys]
                if owners and not (_did_you_mean(key, known) and isinstance(data[key], (Mapping, list))):
                    hint = f"; {key!r} belongs in {' or '.join(owners)}"
            self.fail(_key(prefix, key), f"unknown {what}{hint}")

    def table(self, data: Any, path: str, table: _Table) -> tuple[dict[str, Any], bool]:
        """The valid keys' converted values, and whether the whole table was valid."""
        if not isinstance(data, Mapping):
            self.fail(path, f"must be a table, got {_show(data)}")
            return {}, False
        before = len(self.errors)
        self.unknown_keys(data, path, table.keys)
        values: dict[str, Any] = {}
        for f in table.fields:
            at = f"{path}.{f.key}"
            if f.key not in data:
                if f.required:
                    self.fail(at, "missing required key")
                continue
            try:
                values[f.key] = f.check(data[f.key], self)
            except _ItemErrors as e:
                for suffix, message in e.problems:
                    self.fail(at + suffix, message)
            except ValueError as e:
                self.fail(at, str(e))
        return values, len(self.errors) == before

    def peers(self, data: Any, section: str = "peers") -> list[dict[str, Any]]:
        if isinstance(data, Mapping):
            one = {"peers": "peer", "services": "service", "forwards": "forward"}[section]
            self.fail(section, f"must be an array of tables: write [[{section}]] (one per {one}), not [{section}]")
            return []
        if not isinstance(data, (list, tuple)):
            self.fail(section, f"must be an array of tables ([[{section}]]), got {_show(data)}")
            return []
        return [self.table(item, f"{section}[{i}]", _SECTIONS[section])[0] for i, item in enumerate(data)]

    def check_forwarding(self, node: dict[str, Any], peers: list[dict[str, Any]],
                         services: list[dict[str, Any]], forwards: list[dict[str, Any]]) -> None:
        """Unique service names and listen addresses; every peer named is a configured peer."""
        known = [p["name"] for p in peers if "name" in p]

        def unknown_peer(at: str, name: str) -> None:
            hint = _did_you_mean(name, known) or (f" (configured peers: {', '.join(known)})" if known
                                                  else " (no [[peers]] are configured)")
            self.fail(at, f"{name!r} is not a configured peer{hint}")

        if len(services) > MAX_SERVICES:
            self.fail("services", f"at most {MAX_SERVICES} services, got {len(services)}")
        first: dict[Any, int] = {}
        for i, service in enumerate(services):
            name = service.get("name")
            if name is not None:
                if name in first:
                    self.fail(f"services[{i}].name", f"duplicate service {name!r} (also services[{first[name]}])")
                else:
                    first[name] = i
            for j, peer in enumerate(service.get("allow") or ()):
                if peer not in known:
                    unknown_peer(f"services[{i}].allow[{j}]", peer)
        listens: dict[Any, int] = {}
        own = node.get("listen")
        for i, forward in enumerate(forwards):
            peer = forward.get("peer")
            if peer is not None and peer not in known:
                unknown_peer(f"forwards[{i}].peer", peer)
            listen = forward.get("listen")
            if listen is None or listen.port == 0:
                continue
            if listen in listens:
                self.fail(f"forwards[{i}].listen", f"duplicate listen address {listen} (also forwards[{listens[listen]}])")
            else:
                listens[listen] = i
            if own is not None and listen == own:
                self.fail(f"forwards[{i}].listen", f"{listen} is this node's own QUIC port (node.listen)")

    def check_peer_names(self, node_name: str | None, peers: list[dict[str, Any]]) -> None:
        first: dict[str, int] = {}
        for i, peer in enumerate(peers):
            name = peer.get("name")
            if name is None:
                continue
            if name == node_name:
                self.fail(f"peers[{i}].name",
                          f"{name!r} is this node itself; a node does not list itself as a peer")
            elif name in first:
                self.fail(f"peers[{i}].name", f"duplicate peer {name!r} (also peers[{first[name]}])")
            else:
                first[name] = i

    def check_peer_buffer(self, given: dict[str, Any]) -> None:
        """A sender keeps half of max_peer_buffer unacknowledged: the largest message must fit in it."""
        limits = Limits(**given)
        if limits.max_peer_buffer >= 2 * limits.max_message_size:
            return
        key = "max_peer_buffer" if "max_peer_buffer" in given else "max_message_size"
        self.fail(f"limits.{key}", f"limits.max_peer_buffer ({limits.max_peer_buffer}) must be at least twice "
                                   f"limits.max_message_size ({limits.max_message_size})")

    def check_timer_order(self, given: dict[str, Any]) -> None:
        """Blame the key the user wrote, not the default it collides with."""
        timers = Timers(**given)
        for low, high, strict in _TIMER_ORDER:
            lo, hi = getattr(timers, low), getattr(timers, high)
            if hi > lo or (hi == lo and not strict):
                continue
            if high in given:
                relation = "greater than" if strict else "at least"
                self.fail(f"timers.{high}", f"must be {relation} timers.{low} ({lo!r}), got {hi!r}")
            else:
                relation = "less than" if strict else "at most"
                self.fail(f"timers.{low}",
                          f"must be {relation} timers.{high} ({hi!r}, the default), got {lo!r}")


# --- entry points -------------------------------------------------------------------------------------
def parse_config(
    data: Mapping[str, Any], base_dir: Path, *, source: str | None = None, check_files: bool = True
) -> Config:
    """Build a Config from TOML-shaped data; relative paths resolve against base_dir.

    Raises ConfigError listing every problem, each prefixed by its key path. check_files=False skips
    only the filesystem checks (existence, readability, key file mode).
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"the config must be a table of sections, got {_show(data)}"], source)
    parser = _Parser(Path(os.path.abspath(os.fspath(base_dir))), check_files)
    parser.unknown_keys(data, "", list(_SECTIONS))
    for name in _REQUIRED_SECTIONS:
        if name not in data:
            parser.fail(name, "missing required section")

    values: dict[str, dict[str, Any]] = {}
    valid: dict[str, bool] = {}
    arrays: dict[str, list[dict[str, Any]]] = {}
    for name, table in _SECTIONS.items():
        if name in _ARRAYS:
            arrays[name] = parser.peers(data.get(name, []), name)
            if name == "peers":
                parser.check_peer_names(values.get("node", {}).get("name"), arrays[name])
        elif name in data:
            values[name], valid[name] = parser.table(data[name], name, table)
    peers = arrays["peers"]
    parser.check_forwarding(values.get("node", {}), peers, arrays["services"], arrays["forwards"])

    if valid.get("timers"):
        parser.check_timer_order(values["timers"])
    if valid.get("limits"):
        parser.check_peer_buffer(values["limits"])
    control = values.setdefault("control", {})
    node_name = values.get("node", {}).get("name")
    if "socket" not in control and node_name is not None:
        control["socket"] = _default_socket_path(parser.base_dir, node_name)

    if parser.errors:
        raise ConfigError(parser.errors, source)
    sections = {name: table.cls(**values.get(name, {})) for name, table in _SECTIONS.items()
                if name not in _ARRAYS}
    return Config(**sections, peers=tuple(PeerConfig(**peer) for peer in peers),
                  services=tuple(ServiceConfig(**item) for item in arrays["services"]),
                  forwards=tuple(ForwardConfig(**item) for item in arrays["forwards"]))


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> Config:
    """Read and validate a node.toml; any problem, even an unreadable file, is a ConfigError."""
    source = os.fspath(path)
    file = Path(os.path.abspath(os.path.expanduser(source)))
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {file}"], source) from None
    except IsADirectoryError:
        raise ConfigError([f"config file is a directory: {file}"], source) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file {file}: {e.strerror}"], source) from None
    except ValueError as e:  # a NUL in the path
        raise ConfigError([f"invalid config file path: {e}"], source) from None
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        message = f"invalid TOML in {file}: not UTF-8 text (bad byte at offset {e.start})"
        raise ConfigError([message], source) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"invalid TOML in {file}: {e}"], source) from None
    except RecursionError:
        raise ConfigError([f"invalid TOML in {file}: nested too deeply"], source) from None
    config = parse_config(data, file.parent, source=source, check_files=check_files)
    return dataclasses.replace(config, path=file)


def _header(section: str) -> str:
    return f"[[{section}]]" if section in _ARRAYS else f"[{section}]"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)  # int, or a finite float: repr is valid TOML for both


def render_config(config: Config) -> str:
    """The resolved config as TOML (defaults filled in, paths absolute); parse_config reads it back."""
    lines = ["# quicmesh resolved config: defaults filled in, paths absolute"]
    if config.path is not None:
        lines.append(f"# loaded from {_toml_string(str(config.path))}")
    for section, body in config.to_dict().items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines += ["", _header(section), *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"
