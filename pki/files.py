"""Writing PKI files safely: born with their final mode, never half-written, never silently replaced."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pki import PkiError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIRECTORY_MODE = 0o700


def make_private_dir(path: Path) -> Path:
    """Create ``path`` as 0700 (parents as the umask says), or reuse it if it is already a directory."""
    if path.exists() and not path.is_dir():
        raise PkiError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIRECTORY_MODE)  # the mode applies at creation: no window where others can list it
    except FileExistsError:
        pass
    return path


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Check every output before writing any, so a refusal leaves nothing half-created."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise PkiError(f"{path} exists; use --force to replace")


def write_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (the umask can only narrow it).

    The bytes go to a temporary file in the same directory first; then it is renamed over ``path``
    (``replace``) or hard-linked to ``path``, which fails if ``path`` exists: no race can clobber a key.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise PkiError(f"{path} exists; use --force to replace") from None
    finally:
        temporary.unlink(missing_ok=True)
