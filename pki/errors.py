"""The error quicmesh-pki raises for an operator mistake (re-exported as ``pki.PkiError``)."""

from __future__ import annotations

from quicmesh.errors import QuicmeshError


class PkiError(QuicmeshError):
    """An operator mistake, or a CA/bootstrap directory that cannot be used; the message says what to do."""
