"""The exception hierarchy: every error quicmesh raises on purpose is a QuicmeshError.

A user mistake (bad config, bad cert, bad argument, bad wire bytes, misuse of the API) is reported
through one of these, with a message a human can act on; anything else escaping is a bug.
"""

from __future__ import annotations


class QuicmeshError(Exception):
    """Base class of every error quicmesh raises on purpose."""


# --- identity ---------------------------------------------------------------------------------
class IdentityError(QuicmeshError):
    """A certificate, chain or name failed a quicmesh identity rule."""


class InvalidNameError(IdentityError):
    """A node or mesh name is not a DNS label."""


class ChainError(IdentityError):
    """The chain does not lead to the mesh CA (foreign CA, tampered, malformed, missing intermediate)."""


class ValidityError(IdentityError):
    """The certificate (or one in its chain) is expired or not yet valid."""


class UsageError(IdentityError):
    """Wrong extended key usage / key usage / basic constraints for a node certificate."""


class RevokedError(IdentityError):
    """The certificate is on the CRL or the fingerprint denylist."""


class IdentityMismatchError(IdentityError):
    """A valid certificate, but not of the node or mesh that was expected."""


class PinMismatchError(IdentityError):
    """A valid certificate whose fingerprint differs from the configured pin."""


# --- config -----------------------------------------------------------------------------------
class AnnouncementError(IdentityError):
    """A membership announcement failed a check (signature, name, freshness, mesh); the message says which."""


class ConfigError(QuicmeshError):
    """A config file is invalid. ``errors`` holds every problem found, each prefixed by its key path."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.errors) if len(self.errors) == 1 else
                         head + f"{len(self.errors)} errors:\n  " + "\n  ".join(self.errors))


# --- wire -------------------------------------------------------------------------------------
class ProtocolError(QuicmeshError):
    """Bytes from a peer violate the quicmesh wire protocol. ``code`` is the error code sent back."""

    def __init__(self, message: str, code: int = 0x1) -> None:
        super().__init__(message)
        self.code = code


# --- data plane -------------------------------------------------------------------------------
class PeerError(QuicmeshError):
    """Base of errors about a specific peer."""


class UnknownPeerError(PeerError):
    """The peer name is not in this node's configured peers."""


class PeerNotConnectedError(PeerError):
    """The peer has no verified connection right now (datagrams are not queued for later)."""


class DatagramTooLargeError(QuicmeshError):
    """The datagram payload exceeds ``max_datagram_payload``."""


class MessageTooLargeError(QuicmeshError):
    """The message exceeds the local or the peer's ``max_message_size``."""


class RequestTimeoutError(QuicmeshError):
    """No response arrived within the request timeout."""


class RemoteError(QuicmeshError):
    """The peer's request handler failed (or it has none); the message is the peer's reason."""


class NodeClosedError(QuicmeshError):
    """The node is stopped (or stopping) and cannot take this call."""


# --- durable storage (quicmesh/durable) ---------------------------------------------------------
class StorageError(QuicmeshError):
    """The durable-message database cannot be opened, read or written; the message names the file."""


class OutboxFullError(StorageError):
    """A durable send over the outbox limits ([storage] max_messages / max_bytes, per peer or in total)."""


# --- subjects (quicmesh/pubsub) ----------------------------------------------------------------
class InvalidSubjectError(QuicmeshError):
    """A subject, subject pattern or queue group name breaks the NATS syntax rules (docs/PUBSUB.md)."""


class NoRespondersError(QuicmeshError):
    """No subscriber anywhere in the mesh (that this node can reach) takes requests on this subject."""


class PublishError(QuicmeshError):
    """A reliable publish that some subscribing nodes did not accept (the others did). ``failures`` maps
    each of those nodes to its error; ``delivered`` counts the nodes that accepted it."""

    def __init__(self, message: str, failures: dict[str, Exception], delivered: int) -> None:
        super().__init__(message)
        self.failures = failures
        self.delivered = delivered


__all__ = [
    "QuicmeshError",
    "IdentityError",
    "AnnouncementError",
    "InvalidNameError",
    "ChainError",
    "ValidityError",
    "UsageError",
    "RevokedError",
    "IdentityMismatchError",
    "PinMismatchError",
    "ConfigError",
    "ProtocolError",
    "PeerError",
    "UnknownPeerError",
    "PeerNotConnectedError",
    "DatagramTooLargeError",
    "MessageTooLargeError",
    "RequestTimeoutError",
    "RemoteError",
    "NodeClosedError",
    "InvalidSubjectError",
    "NoRespondersError",
    "PublishError",
    "StorageError",
    "OutboxFullError",
]
