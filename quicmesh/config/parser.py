"""Reading a node.toml: TOML -> Config, every error reported at once, each prefixed by its key path.

Drop-ins: every ``conf.d/*.toml`` beside the config file is merged over it, in name order. Tables merge
key by key (a later file's value replaces an earlier one's, nested tables merge the same way); arrays of
tables (``[[peers]]``, ``[[services]]``, ...) append; any other value, plain arrays included, is replaced
whole. With drop-ins, each error names its file and the key path within that file.

Pure on purpose: besides reading the config files it only stats the files it names. Certificates are
parsed by quicmesh.protocol.identity, sockets opened by the node.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from quicmesh.config.model import Config, ForwardConfig, Limits, MeshSection, PeerConfig, ServiceConfig, Timers
from quicmesh.config.schema import (
    ARRAY_SECTIONS,
    REQUIRED_SECTIONS,
    SECTIONS,
    TIMER_ORDER,
    ItemErrors,
    Table,
    did_you_mean,
    header,
)
from quicmesh.errors import ConfigError
from quicmesh.ops.socket_paths import default_socket_path
from quicmesh.protocol import wire
from quicmesh.protocol.text import show


def _key(prefix: str, key: object) -> str:
    text = key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key) else show(key)
    return f"{prefix}.{text}" if prefix else text


class Parser:
    """Walks the data against the schema, collecting every error instead of stopping at the first."""

    def __init__(self, base_dir: Path, check_files: bool, where: Callable[[str], str] | None = None) -> None:
        self.base_dir = base_dir
        self.check_files = check_files
        self.errors: list[str] = []
        self.where = where or (lambda path: path)  # key path -> where the user wrote it (drop-ins: file too)

    def fail(self, path: str, message: str) -> None:
        self.errors.append(f"{self.where(path)}: {message}")

    def unknown_keys(self, data: Mapping[Any, Any], prefix: str, known: list[str]) -> None:
        what = "key" if prefix else "section"
        for key in data:
            if key in known:
                continue
            hint = did_you_mean(key, known) or f" (known {what}s: {', '.join(known)})"
            if not prefix:  # a key written above every [section], most likely
                owners = [header(s) for s, table in SECTIONS.items() if key in table.keys]
                if owners and not (did_you_mean(key, known) and isinstance(data[key], (Mapping, list))):
                    hint = f"; {key!r} belongs in {' or '.join(owners)}"
            self.fail(_key(prefix, key), f"unknown {what}{hint}")

    def table(self, data: Any, path: str, table: Table) -> tuple[dict[str, Any], bool]:
        """The valid keys' converted values, and whether the whole table was valid."""
        if not isinstance(data, Mapping):
            self.fail(path, f"must be a table, got {show(data)}")
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
            except ItemErrors as e:
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
            self.fail(section, f"must be an array of tables ([[{section}]]), got {show(data)}")
            return []
        return [self.table(item, f"{section}[{i}]", SECTIONS[section])[0] for i, item in enumerate(data)]

    def check_forwarding(self, node: dict[str, Any], peers: list[dict[str, Any]],
                         services: list[dict[str, Any]], forwards: list[dict[str, Any]]) -> None:
        """Unique service names and listen addresses; every peer named is a configured peer."""
        known = [p["name"] for p in peers if "name" in p]

        def unknown_peer(at: str, name: str) -> None:
            hint = did_you_mean(name, known) or (f" (configured peers: {', '.join(known)})" if known
                                                  else " (no [[peers]] are configured)")
            self.fail(at, f"{name!r} is not a configured peer{hint}")

        if len(services) > wire.MAX_SERVICES:
            self.fail("services", f"at most {wire.MAX_SERVICES} services, got {len(services)}")
        first: dict[Any, int] = {}
        for i, service in enumerate(services):
            name = service.get("name")
            if name is not None:
                if name in first:
                    also = self.where(f"services[{first[name]}]")
                    self.fail(f"services[{i}].name", f"duplicate service {name!r} (also {also})")
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
                also = self.where(f"forwards[{listens[listen]}]")
                self.fail(f"forwards[{i}].listen", f"duplicate listen address {listen} (also {also})")
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
                self.fail(f"peers[{i}].name", f"duplicate peer {name!r} (also {self.where(f'peers[{first[name]}]')})")
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
        timers = {field.name: given.get(field.name, field.default) for field in dataclasses.fields(Timers)}
        for low, high, strict in TIMER_ORDER:  # before a Timers exists: it refuses a wrong order itself
            lo, hi = timers[low], timers[high]
            if hi > lo or (hi == lo and not strict):
                continue
            if high in given:
                relation = "greater than" if strict else "at least"
                self.fail(f"timers.{high}", f"must be {relation} timers.{low} ({lo!r}), got {hi!r}")
            else:
                relation = "less than" if strict else "at most"
                self.fail(f"timers.{low}",
                          f"must be {relation} timers.{high} ({hi!r}, the default), got {lo!r}")

    def check_mesh(self, given: dict[str, Any]) -> None:
        """Seeds only make sense with open membership; a member must be heard from more often than it times out."""
        mesh = MeshSection(**given)
        if mesh.seeds and not mesh.open:
            key = "members" if "members" in given else "seeds"
            self.fail(f"mesh.{key}", 'mesh.seeds need mesh.members = "any-certified" (a seed tells this node '
                                     f'about members that are not in [[peers]]), got members = "{mesh.members}"')
        if mesh.member_timeout <= mesh.announce_interval:
            key = "member_timeout" if "member_timeout" in given else "announce_interval"
            self.fail(f"mesh.{key}", f"mesh.member_timeout ({mesh.member_timeout:g}) must be greater than "
                                     f"mesh.announce_interval ({mesh.announce_interval:g})")


# --- entry points -------------------------------------------------------------------------------------
def parse_config(
    data: Mapping[str, Any], base_dir: Path, *, source: str | None = None, check_files: bool = True,
    where: Callable[[str], str] | None = None,
) -> Config:
    """Build a Config from TOML-shaped data; relative paths resolve against base_dir.

    Raises ConfigError listing every problem, each prefixed by its key path (``where`` rewrites a key
    path into the place the user wrote it, for merged files). check_files=False skips only the
    filesystem checks (existence, readability, key file mode).
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"the config must be a table of sections, got {show(data)}"], source)
    parser = Parser(Path(os.path.abspath(os.fspath(base_dir))), check_files, where)
    parser.unknown_keys(data, "", list(SECTIONS))
    for name in REQUIRED_SECTIONS:
        if name not in data:
            parser.fail(name, "missing required section")

    values: dict[str, dict[str, Any]] = {}
    valid: dict[str, bool] = {}
    arrays: dict[str, list[dict[str, Any]]] = {}
    for name, table in SECTIONS.items():
        if name in ARRAY_SECTIONS:
            arrays[name] = parser.peers(data.get(name, []), name)
            if name == "peers":
                parser.check_peer_names(values.get("node", {}).get("name"), arrays[name])
        elif name in data:
            values[name], valid[name] = parser.table(data[name], name, table)
    peers = arrays["peers"]
    parser.check_forwarding(values.get("node", {}), peers, arrays["services"], arrays["forwards"])
    known_peers = [p["name"] for p in peers if "name" in p]
    for i, entry in enumerate(values.get("pubsub", {}).get("peers", ())):  # permissions for a typo: nobody's
        if entry.name not in known_peers:
            parser.fail(f"pubsub.peers[{i}].name", f"{entry.name!r} is not a configured peer"
                        + (did_you_mean(entry.name, known_peers) or f" (configured peers: {', '.join(known_peers) or 'none'})"))

    if valid.get("timers"):
        parser.check_timer_order(values["timers"])
    if valid.get("limits"):
        parser.check_peer_buffer(values["limits"])
    if valid.get("mesh"):
        parser.check_mesh(values["mesh"])
    control = values.setdefault("control", {})
    node_name = values.get("node", {}).get("name")
    if "socket" not in control and node_name is not None:
        control["socket"] = default_socket_path(parser.base_dir, node_name)

    if parser.errors:
        raise ConfigError(parser.errors, source)
    sections = {name: table.cls(**values.get(name, {})) for name, table in SECTIONS.items()
                if name not in ARRAY_SECTIONS}
    return Config(**sections, peers=tuple(PeerConfig(**peer) for peer in peers),
                  services=tuple(ServiceConfig(**item) for item in arrays["services"]),
                  forwards=tuple(ForwardConfig(**item) for item in arrays["forwards"]))


DROP_IN_DIR = "conf.d"


def drop_in_files(config_path: str | os.PathLike[str]) -> list[Path]:
    """The ``conf.d/*.toml`` files beside a config file, in the order they are merged (by name)."""
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(config_path)))).parent / DROP_IN_DIR
    try:
        return sorted((p for p in folder.glob("*.toml") if p.is_file()), key=lambda p: p.name)
    except OSError:
        return []


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> Config:
    """Read and validate a node.toml and its drop-ins; any problem, even an unreadable file, is a ConfigError."""
    source = os.fspath(path)
    file = Path(os.path.abspath(os.path.expanduser(source)))
    data = _read_toml(file, source)
    drop_ins = drop_in_files(file)
    if not drop_ins:
        config = parse_config(data, file.parent, source=source, check_files=check_files)
        return dataclasses.replace(config, path=file)
    layers = [(source, data)]
    for drop_in in drop_ins:
        label = os.path.join(os.path.dirname(source), DROP_IN_DIR, drop_in.name)
        layers.append((label, _read_toml(drop_in, label)))
    merged, origins = merge_layers(layers)
    config = parse_config(merged, file.parent, check_files=check_files,
                          where=lambda key_path: _locate(key_path, origins, source))
    return dataclasses.replace(config, path=file)


Origins = dict[str, tuple[str, str]]  # merged key path -> (file, key path within that file)


def merge_layers(layers: list[tuple[str, Mapping[str, Any]]]) -> tuple[dict[str, Any], Origins]:
    """Merge (file, data) layers in order (rules in the module docstring); where each key came from."""
    merged: dict[str, Any] = {}
    origins: Origins = {}
    for label, data in layers:
        _merge_table(merged, data, "", label, origins)
    return merged, origins


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _merge_table(into: dict[str, Any], data: Mapping[str, Any], prefix: str, label: str, origins: Origins) -> None:
    for key, value in data.items():
        at = _key(prefix, key)
        current = into.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge_table(current, value, at, label, origins)
        elif _is_table_array(value) and _is_table_array(current):
            for i, item in enumerate(value):
                origins[f"{at}[{len(current)}]"] = (label, f"{at}[{i}]")
                current.append(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(value)
            origins[at] = (label, at)
            for inner in [k for k in origins if k.startswith((at + ".", at + "["))]:
                del origins[inner]  # replaced whole: nothing below it comes from an earlier file


def _locate(key_path: str, origins: Origins, main: str) -> str:
    """``file: key path in that file`` for a merged key path (the main file for what no file wrote)."""
    best = ""
    for known in origins:
        if len(known) > len(best) and (key_path == known or key_path.startswith((known + ".", known + "["))):
            best = known
    if not best:
        return f"{main}: {key_path}"
    label, local = origins[best]
    return f"{label}: {local}{key_path[len(best):]}"


def _read_toml(file: Path, source: str) -> Any:
    """One TOML file's data; every way it can fail is a ConfigError naming ``source``."""
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
    return data
