"""quicmesh-pki: the operator's tool for a mesh's private CA, node certificates, revocation and bootstrap.

Library modules: ``authority`` (CA, issuing, CSRs, renewal, revocation), ``bootstrap`` (a whole mesh at once),
``report`` (print), ``layout`` (file names, mesh.json), ``files`` (safe writes), ``defaults`` (key types and
validity defaults, import-light); ``cli`` is a thin shell.

``PkiError`` lives in ``pki.errors`` and is loaded on first use: importing ``pki`` (as `quicmesh-pki --help`
does) must not pull in the quicmesh package, whose __init__ loads cryptography and aioquic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pki.errors import PkiError

__all__ = ["PkiError"]


def __getattr__(name: str) -> Any:
    if name == "PkiError":
        from pki.errors import PkiError

        return PkiError
    raise AttributeError(f"module 'pki' has no attribute {name!r}")
