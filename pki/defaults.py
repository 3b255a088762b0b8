"""Key types and validity defaults, in a module that imports nothing: the argument parser of
`quicmesh-pki` needs them for its help, and `--help` must not load cryptography."""

from __future__ import annotations

KEY_TYPES = ("p256", "p384", "ed25519", "rsa2048")
DEFAULT_KEY_TYPE = "p256"
DEFAULT_CA_DAYS = 3650
DEFAULT_INTERMEDIATE_DAYS = 1825
DEFAULT_NODE_DAYS = 365
DEFAULT_CRL_DAYS = 30
MAX_DAYS = 36500
