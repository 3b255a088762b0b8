"""Certificate dates: UTC, days left, and how messages show them.

Light on purpose (no cryptography): the status table, metrics and log warnings use it on the datetimes a
certificate holds, and the identity rules and the PKI tool on the certificates themselves.
"""

from __future__ import annotations

import datetime as dt

CERT_WARNING_DAYS = 30
"""A certificate with fewer days left than this is flagged by `quicmesh status`, the log and check-config."""


def as_utc(now: dt.datetime | None = None) -> dt.datetime:
    """``now`` as an aware UTC datetime, the current time if None (naive datetimes are taken as UTC)."""
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    return now.replace(tzinfo=dt.timezone.utc) if now.tzinfo is None else now.astimezone(dt.timezone.utc)


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> float:
    """Days until ``not_after`` (a certificate's expiry), negative once it passed."""
    return (as_utc(not_after) - as_utc(now)).total_seconds() / 86400


def format_utc(moment: dt.datetime) -> str:
    """A certificate date as messages show it: ``2025-01-31 12:00:00 UTC``."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
