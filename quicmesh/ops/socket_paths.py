"""Where a node's control socket goes: `quicmesh run` (through the config) and the client commands
derive the same path, within what a Unix socket address can hold. Light: the client commands import it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
DEFAULT_SOCKET_NAME = "quicmesh.sock"


def socket_path_fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES


def default_socket_path(base_dir: Path, node: str) -> Path:
    """<config dir>/quicmesh.sock, or, if that is too long for a Unix socket, a short path that
    `quicmesh run` and `quicmesh status` derive alike from the config folder and the node name."""
    path = base_dir / DEFAULT_SOCKET_NAME
    if socket_path_fits(path):
        return path
    digest = hashlib.sha256(str(base_dir).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    name = f"quicmesh-{node}-{digest}.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime_dir) and socket_path_fits(Path(runtime_dir, name)):
        return Path(runtime_dir, name)
    return Path("/tmp", name)  # at most 14 + 63 + 22 bytes: always fits
