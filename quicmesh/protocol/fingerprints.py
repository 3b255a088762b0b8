"""Certificate fingerprints as people write them: one normaliser for config pins, denylists and the PKI tool.

Light on purpose (no cryptography): the config parser uses it, and client commands must stay fast.
"""

from __future__ import annotations

import re

from quicmesh.errors import IdentityError
from quicmesh.protocol.text import show

FINGERPRINT_FORM = '"sha256:" followed by 64 hex digits (colons between bytes allowed)'
_DIGITS = re.compile(r"[0-9a-f]{64}|[0-9a-f]{2}(:[0-9a-f]{2}){31}")


class FingerprintError(IdentityError, ValueError):
    """Not a fingerprint: an identity error, and a ValueError so config checks report it like any bad value."""


def normalize_fingerprint(text: object) -> str:
    """Return "sha256:<64 lower-case hex>"; accepts any case, and colons between byte pairs as openssl writes."""
    if not isinstance(text, str):
        raise FingerprintError(f"a fingerprint must be a string ({FINGERPRINT_FORM}), got {show(text)}")
    scheme, sep, digits = text.partition(":")
    digits = digits.lower()
    if sep and scheme.lower() == "sha256" and _DIGITS.fullmatch(digits):
        return "sha256:" + digits.replace(":", "")
    hint = "; add the 'sha256:' prefix" if _DIGITS.fullmatch(text.lower()) else ""
    raise FingerprintError(f"invalid fingerprint {show(text)}: expected {FINGERPRINT_FORM}{hint}")
