"""quicmesh-pki: the operator's tool for a mesh's private CA, node certificates, revocation and bootstrap.

Library modules: ``authority`` (CA, issuing, revocation), ``bootstrap`` (a whole mesh at once),
``report`` (print), ``layout`` (file names, mesh.json), ``files`` (safe writes); ``cli`` is a thin shell.
"""

from __future__ import annotations

from quicmesh.errors import QuicmeshError


class PkiError(QuicmeshError):
    """An operator mistake, or a CA/bootstrap directory that cannot be used; the message says what to do."""
