"""The ONE place where quicmesh touches aioquic's private internals.

aioquic (1.7.x) has no public API for what mutual TLS needs, so this module:

1. makes the server request a client certificate (``tls.Context._request_client_certificate``);
2. refuses an EMPTY client Certificate message (aioquic would carry on unauthenticated);
3. runs quicmesh's own verification of the peer's chain and identity inside the TLS handshake, on both
   sides, turning every failure into a TLS alert so that aioquic closes the connection with a reason
   (only ``tls.Alert`` raised inside a handler becomes a CONNECTION_CLOSE; anything else would leave the
   peer connected and unchallenged);
4. reads the peer certificate chain (``_peer_certificate``/``_peer_certificate_chain``), the smoothed RTT
   (``_loss._rtt_smoothed``) and the length of aioquic's datagram queue (``_datagrams_pending``);
5. lets a delayed ACK ride on data the node is about to send (``_spaces[ONE_RTT].ack_at``): aioquic only
   adds an ACK to a packet once the ACK is due, so a reply left without it and a separate ACK-only packet
   followed 1 ms later, waking the peer once more per request (and a keepalive PING is answered at once);
6. swaps the three 16 KiB TLS output buffers (``_crypto_buffers``) for small ones once the handshake is
   done: only the handshake writes into them, and they were a fifth of a connection's memory.

``tests/test_aioquic_internals.py`` checks each of these against the installed aioquic and fails loudly
when an upgrade moves them; pyproject pins aioquic to the range tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from cryptography import x509

from quicmesh.errors import ChainError, IdentityError, RevokedError, ValidityError

#: What the TLS layer may still write once the handshake is done: nothing with tickets off (quicmesh's
#: configuration); a little room in case, instead of aioquic's 16 KiB per epoch.
_POST_HANDSHAKE_CRYPTO_BUFFER = 1024

#: The TLS hook: given the peer's chain (leaf first), return the verified peer object or raise.
PeerVerifier = Callable[[Sequence[x509.Certificate]], Any]

_PRIVATE_TLS_ATTRIBUTES = (
    "_request_client_certificate",
    "_server_handle_certificate",
    "_server_handle_certificate_verify",
    "_client_handle_certificate_verify",
    "_peer_certificate",
    "_peer_certificate_chain",
)


class _AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class _AlertCertificateRevoked(tls.Alert):
    description = tls.AlertDescription.certificate_revoked


def _alert_for(error: Exception) -> tls.Alert:
    """Map a verification failure to the TLS alert that tells the peer why."""
    if isinstance(error, RevokedError):
        return _AlertCertificateRevoked(str(error))
    if isinstance(error, ValidityError):
        return tls.AlertCertificateExpired(str(error))
    if isinstance(error, IdentityError):
        return tls.AlertBadCertificate(str(error))
    # A bug in verification must still refuse the peer, never let it through.
    return tls.AlertInternalError(f"certificate verification failed: {type(error).__name__}")


class MeshQuicConnection(QuicConnection):
    """A QuicConnection whose TLS handshake enforces quicmesh's mutual authentication.

    ``verify_peer`` runs once the peer has proven possession of its key (after CertificateVerify);
    what it returns is kept in ``verified_peer``. Until that is set, the connection is unauthenticated.
    """

    def __init__(self, *, verify_peer: PeerVerifier, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._verify_peer = verify_peer
        self.verified_peer: Any = None
        self.verify_error: Exception | None = None

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        context = self.tls
        if self._is_client:
            original_verify = context._client_handle_certificate_verify

            def client_handle_certificate_verify(input_buf: Any) -> None:
                try:
                    original_verify(input_buf)  # signature and aioquic's own chain check (mesh CA only)
                except tls.Alert as alert:
                    self.verify_error = ChainError(f"peer certificate refused: {alert}")
                    raise
                self._run_verifier()

            context._client_handle_certificate_verify = client_handle_certificate_verify
        else:
            context._request_client_certificate = True
            original_certificate = context._server_handle_certificate
            original_verify = context._server_handle_certificate_verify

            def server_handle_certificate(input_buf: Any) -> None:
                original_certificate(input_buf)
                if context._peer_certificate is None:
                    self.verify_error = IdentityError("peer sent no client certificate")
                    raise _AlertCertificateRequired("a client certificate is required")

            def server_handle_certificate_verify(input_buf: Any) -> None:
                original_verify(input_buf)  # proves possession of the key
                self._run_verifier()

            context._server_handle_certificate = server_handle_certificate
            context._server_handle_certificate_verify = server_handle_certificate_verify

    def _run_verifier(self) -> None:
        chain = [self.tls._peer_certificate, *self.tls._peer_certificate_chain]
        try:
            self.verified_peer = self._verify_peer(chain)
        except Exception as error:  # noqa: BLE001 - every failure must become an alert
            self.verify_error = error
            raise _alert_for(error) from error

    def peer_chain(self) -> list[x509.Certificate]:
        """The chain the peer presented (leaf first); empty before the handshake got that far."""
        tls_context = getattr(self, "tls", None)
        if tls_context is None or tls_context._peer_certificate is None:
            return []
        return [tls_context._peer_certificate, *tls_context._peer_certificate_chain]

    def smoothed_rtt(self) -> float | None:
        """Smoothed RTT in seconds, or None before the first sample."""
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def handshake_complete(self) -> bool:
        """Whether the TLS handshake has completed (for a server: the client proved its identity)."""
        return bool(self._handshake_complete)

    def pending_datagrams(self) -> int:
        """How many DATAGRAM frames wait in aioquic's (unbounded) queue."""
        return len(self._datagrams_pending)

    def release_handshake_buffers(self) -> None:
        """Shrink the TLS output buffers after the handshake (call on HandshakeCompleted, which aioquic
        reports after the last handshake message was written and pushed)."""
        self._crypto_buffers = {epoch: Buffer(capacity=_POST_HANDSHAKE_CRYPTO_BUFFER) for epoch in self._crypto_buffers}

    def ack_with_next_packet(self, now: float) -> None:
        """Make a delayed ACK due now (RFC 9000 13.2.1: the delay is an upper bound): it leaves with the data
        about to be sent instead of alone when its timer fires, or at once when there is nothing to wait for."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now


def check_internals() -> list[str]:
    """Return what this module relies on but the installed aioquic lacks (empty = all present)."""
    from aioquic.quic.configuration import QuicConfiguration

    missing = [
        f"aioquic.tls.Context.{name}"
        for name in _PRIVATE_TLS_ATTRIBUTES
        if not hasattr(tls.Context(is_client=False), name)
    ]
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for name in ("_initialize", "_is_client", "_loss", "_datagrams_pending", "_handshake_complete", "_spaces",
                 "_crypto_buffers"):
        if not hasattr(connection, name):
            missing.append(f"aioquic QuicConnection.{name}")
    from aioquic.quic.recovery import QuicPacketSpace

    if not hasattr(QuicPacketSpace(), "ack_at"):
        missing.append("aioquic QuicPacketSpace.ack_at")
    loss = getattr(connection, "_loss", None)
    for name in ("_rtt_smoothed", "_rtt_initialized"):
        if not hasattr(loss, name):
            missing.append(f"aioquic QuicPacketRecovery.{name}")
    return missing
