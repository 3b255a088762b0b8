"""The daemon's eye on its credentials: which of its TLS files changed on disk, and what is about to go wrong
with the ones in force (a certificate near its expiry, a CRL past its nextUpdate).

Polling, not inotify: a stat of four files every two seconds costs nothing, works on every filesystem
(NFS, container bind mounts, Kubernetes Secret volumes, whose files change by a symlink swap) and sees an
atomic rename as well as an in-place write, because it compares inode, size and mtime.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from quicmesh.protocol.dates import CERT_WARNING_DAYS, days_left

POLL_INTERVAL = 2.0  # seconds between two looks at the files
SETTLE_DELAY = 0.3   # a change is acted on once the files stay still this long (a renew writes cert, then key)
MAX_SETTLE_ROUNDS = 10

Signature = tuple[int, int, int, int] | None  # (device, inode, size, mtime ns); None: missing or unreadable


def signature(path: Path) -> Signature:
    """What identifies this version of the file: it differs after any rewrite, copy or rename over it."""
    try:
        info = os.stat(path)  # follows symlinks: a Secret volume's ..data swap shows as a new inode
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class FileWatch:
    """Remembers a signature per file; :meth:`changed` names the files that differ since :meth:`remember`."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self._seen: dict[Path, Signature] = {}
        self.remember(paths)

    @property
    def paths(self) -> list[Path]:
        return list(self._seen)

    def remember(self, paths: Iterable[Path]) -> None:
        """Watch exactly ``paths`` from now on, taking their current versions as known."""
        self._seen = {Path(path): signature(Path(path)) for path in paths}

    def changed(self) -> list[Path]:
        return [path for path, seen in self._seen.items() if signature(path) != seen]


@dataclass(frozen=True)
class CredentialWarning:
    """Something the operator must act on soon. ``kind`` is stable (metrics label, log field, tests);
    ``text`` says what and what to do, with today's numbers; ``date`` is the date it is about, so a
    renewed certificate that is still short-lived counts as a new warning."""

    kind: str
    text: str
    date: datetime

    @property
    def key(self) -> tuple[str, datetime]:
        """What stays the same while the warning does (its text counts the days down)."""
        return (self.kind, self.date)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.text, "date": self.date.isoformat()}


@dataclass(frozen=True)
class CredentialDates:
    """The dates of the credentials in force: the node's certificate, the mesh CA's, the CRL's nextUpdate
    (the earliest, for a bundle; None without a CRL or when the CRL names none)."""

    cert_not_after: datetime
    ca_not_after: datetime
    crl_next_update: datetime | None = None

    def warnings(self, now: datetime | None = None) -> list[CredentialWarning]:
        found = [_expiry_warning("cert", "node certificate", self.cert_not_after, now),
                 _expiry_warning("ca", "mesh CA certificate", self.ca_not_after, now)]
        next_update = self.crl_next_update
        if next_update is not None and (left := days_left(next_update, now)) < 0:
            found.append(CredentialWarning(
                "crl_stale", f"CRL is stale: past its nextUpdate by {-left:.1f} days ({next_update.isoformat()}): "
                             "re-sign it (quicmesh-pki crl) and copy it here", next_update))
        return [warning for warning in found if warning is not None]


def _expiry_warning(which: str, what: str, not_after: datetime, now: datetime | None) -> CredentialWarning | None:
    left = days_left(not_after, now)
    if left < 0:
        return CredentialWarning(f"{which}_expired", f"{what} EXPIRED {-left:.1f} days ago "
                                                     f"({not_after.isoformat()}): renew it", not_after)
    if left < CERT_WARNING_DAYS:
        return CredentialWarning(f"{which}_expiring", f"{what} expires in {left:.1f} days "
                                                      f"({not_after.isoformat()}): renew it", not_after)
    return None


WARNING_KINDS = ("cert_expiring", "cert_expired", "ca_expiring", "ca_expired", "crl_stale")
