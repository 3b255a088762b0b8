"""What every `quicmesh` subcommand shares: exit codes, argument types, one-line errors, and where the
node is (config file and control socket, from flags, the environment or the default path).

Light on purpose: client commands import it, and a health check that runs every few seconds must not
load the config parser (nor aioquic, nor cryptography) when a socket path is enough.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from quicmesh.errors import ConfigError
from quicmesh.ops.control import SOCKET_ENVS, socket_from_environment, socket_path

if TYPE_CHECKING:
    from quicmesh.config import Config

EXIT_OK, EXIT_FAILED, EXIT_BAD_USAGE = 0, 1, 2
CONFIG_ENV = "QUICMESH_CONFIG"
DEFAULT_CONFIG = Path("/etc/quicmesh/node.toml")

WHERE_HELP = (f"The config is -c, else ${CONFIG_ENV}, else {DEFAULT_CONFIG}.\nThe control socket is --socket, "
              f"else ${SOCKET_ENVS[0]}, else ${SOCKET_ENVS[1]}, else control.socket of the config.")


def error(message: str) -> None:
    print(f"quicmesh: error: {message}", file=sys.stderr, flush=True)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"seconds must be between 0 and 86400, got {text}")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def config_path(given: str | None) -> str:
    """The config file to read: ``given`` (-c), else $QUICMESH_CONFIG, else /etc/quicmesh/node.toml.
    A missing default is a one-line ConfigError naming everything that was tried."""
    if given:
        return given
    from_environment = os.environ.get(CONFIG_ENV)
    if from_environment:
        if not os.path.exists(from_environment):
            raise ConfigError([f"config file not found: {from_environment} (from ${CONFIG_ENV})"])
        return from_environment
    if not DEFAULT_CONFIG.exists():
        raise ConfigError([f"no config: no -c given, ${CONFIG_ENV} is not set and {DEFAULT_CONFIG} does not "
                           "exist (give -c node.toml)"])
    return str(DEFAULT_CONFIG)


def load(given: str | None) -> Config:
    from quicmesh.config import load_config  # only where a config is read: a socket path alone needs none

    return load_config(config_path(given))


def node_socket(args: argparse.Namespace) -> tuple[Path, Config | None]:
    """The control socket of the node a client command talks to, and the config read to find it (if any)."""
    if args.socket:
        return socket_path(explicit=args.socket), None
    if socket_from_environment() is not None and not args.config:
        return socket_path(), None
    if not (args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG.exists()):
        raise ConfigError([f"which node? no --socket, ${SOCKET_ENVS[0]}, ${SOCKET_ENVS[1]}, -c or ${CONFIG_ENV} "
                           f"given, and {DEFAULT_CONFIG} does not exist"])
    config = load(args.config)
    return socket_path(config), config
