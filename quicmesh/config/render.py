"""The resolved config as TOML: what `quicmesh check-config` prints, and what parse_config reads back."""

from __future__ import annotations

from typing import Any

from quicmesh.config.model import Config
from quicmesh.config.schema import header
from quicmesh.protocol.text import toml_string


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (pubsub.peers entries): keys are bare names
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)  # int, or a finite float: repr is valid TOML for both


def render_config(config: Config) -> str:
    """The resolved config as TOML (defaults filled in, paths absolute); parse_config reads it back."""
    lines = ["# quicmesh resolved config: defaults filled in, paths absolute"]
    if config.path is not None:
        lines.append(f"# loaded from {toml_string(str(config.path))}")
    for section, body in config.to_dict().items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines += ["", header(section), *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"
