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
   done: only the handshake writes into them, and they were a fifth of a connection's memory;
7. path MTU discovery (transport/pmtud.py decides): builds PING + PADDING probe packets of a given size
   with aioquic's packet builder (``_datagram_needs_padding``, ``_packet_number``, ``_cryptos``, ``_loss``),
   sets the packet size (``_max_datagram_size``), watches losses of large packets
   (``_loss._on_packets_lost``) and drops queued DATAGRAM frames a smaller size no longer carries.

``tests/test_aioquic_internals.py`` checks each of these against the installed aioquic and fails loudly
when an upgrade moves them; pyproject pins aioquic to the range tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.congestion.base import K_INITIAL_WINDOW
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.connection import END_STATES, PING_FRAME_CAPACITY, NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from cryptography import x509

from quicmesh.errors import ChainError, IdentityError, RevokedError, ValidityError
from quicmesh.transport.pmtud import DEFAULT_CAP, PathMtu

#: What the TLS layer may still write once the handshake is done: nothing with tickets off (quicmesh's
#: configuration); a little room in case, instead of aioquic's 16 KiB per epoch.
_POST_HANDSHAKE_CRYPTO_BUFFER = 1024

#: Bytes of a 1-RTT packet around a DATAGRAM frame's data: header (flags, 8-byte CID, packet number), AEAD
#: tag, frame type and length; a queued frame longer than the packet size minus this cannot be sent.
_DATAGRAM_FRAME_OVERHEAD = 30

#: A packet within this many bytes of the packet size counts as full (the next frame did not fit).
_FULL_PACKET_SLACK = 64

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

    def __init__(self, *, verify_peer: PeerVerifier, max_packet_size: int | None = DEFAULT_CAP, **kwargs: Any) -> None:
        """``max_packet_size``: the largest packet path MTU discovery may raise the size to, and so the
        largest DATAGRAM frame accepted from the peer (None: packets stay at the configuration's size)."""
        configuration = kwargs["configuration"]
        self.max_packet_size = max(max_packet_size or 0, configuration.max_datagram_size)
        if configuration.max_datagram_frame_size is not None:
            configuration.max_datagram_frame_size = max(configuration.max_datagram_frame_size, self.max_packet_size)
        super().__init__(**kwargs)
        self._verify_peer = verify_peer
        self.verified_peer: Any = None
        self.verify_error: Exception | None = None
        #: the size of the packets sent now (path MTU discovery raises it)
        self.packet_size: int = self._max_datagram_size
        self.path_mtu: PathMtu | None = None
        self.datagrams_dropped_path_mtu = 0  # queued DATAGRAM frames too large after a fall back

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


    # --- path MTU discovery (transport/pmtud.py) ------------------------------------------------------
    def start_path_mtu_discovery(self) -> None:
        """Probe for larger packets once the handshake is confirmed and a full-size packet went out (a
        direct path: a relayed connection's packets travel inside another connection's datagrams and keep
        their size)."""
        if self.path_mtu is None and self.max_packet_size > self._max_datagram_size:
            self.path_mtu = PathMtu(self._max_datagram_size, self.max_packet_size)
            original = self._loss._on_packets_lost

            def on_packets_lost(*, packets: Any, **kwargs: Any) -> None:
                packets = list(packets)
                if any(packet.in_flight and packet.sent_bytes > self.path_mtu.base for packet in packets):
                    self.path_mtu.large_packet_lost()
                original(packets=packets, **kwargs)

            self._loss._on_packets_lost = on_packets_lost

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        datagrams = super().datagrams_to_send(now)
        path_mtu = self.path_mtu
        if path_mtu is not None and self._handshake_confirmed and self._state not in END_STATES:
            if not path_mtu.started:
                if not any(len(data) > self.packet_size - _FULL_PACKET_SLACK for data, _ in datagrams):
                    return datagrams
                path_mtu.start()
            size = path_mtu.probe(now)
            if size is not None:
                datagrams.append((self._probe_packet(size, now), self._network_paths[0].addr))
        return datagrams

    def _probe_packet(self, size: int, now: float) -> bytes:
        """One 1-RTT packet of exactly ``size`` bytes: PING, then PADDING (RFC 9000 14.4); not counted as
        bytes in flight, so neither its loss nor its size touches congestion control."""
        builder = QuicPacketBuilder(
            host_cid=self.host_cid, is_client=self._is_client, max_datagram_size=size,
            packet_number=self._packet_number, peer_cid=self._peer_cid.cid, peer_token=self._peer_token,
            quic_logger=self._quic_logger, spin_bit=self._spin_bit, version=self._version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[tls.Epoch.ONE_RTT])
        builder.start_frame(QuicFrameType.PING, capacity=PING_FRAME_CAPACITY, handler=self._on_probe_delivery,
                            handler_args=(size,))
        builder._datagram_needs_padding = True  # pad the packet to the whole datagram
        datagrams, packets = builder.flush()
        self._packet_number = builder.packet_number
        space = self._spaces[tls.Epoch.ONE_RTT]
        for packet in packets:
            packet.sent_time = now
            packet.in_flight = False
            self._loss.on_packet_sent(packet=packet, space=space)
        return datagrams[0]

    def _on_probe_delivery(self, delivery: QuicDeliveryState, size: int) -> None:
        path_mtu = self.path_mtu
        assert path_mtu is not None
        if delivery == QuicDeliveryState.ACKED:
            if path_mtu.acked(size):
                self._use_packet_size(path_mtu.size)
        elif path_mtu.lost(size):
            self._use_packet_size(path_mtu.size)
            limit = path_mtu.size - _DATAGRAM_FRAME_OVERHEAD
            kept = [data for data in self._datagrams_pending if len(data) <= limit]
            self.datagrams_dropped_path_mtu += len(self._datagrams_pending) - len(kept)
            self._datagrams_pending.clear()
            self._datagrams_pending.extend(kept)


    def _use_packet_size(self, size: int) -> None:
        """Packets of ``size`` from now on; congestion control counts in packets of that size too (RFC 9002
        7.2), so its window holds at least two of them: a full-size DATAGRAM frame fits (no other frame
        can carry it, and a window smaller than one packet would hold it back for good). The pacer keeps
        the base size: it charges every packet a full packet's time, and a request's small packet would
        be charged as 16 KiB."""
        self._max_datagram_size = self.packet_size = size
        loss = self._loss
        loss._cc._max_datagram_size = size
        if isinstance(loss._cc, CubicCongestionControl):
            loss._cc.additive_increase_factor = size
        loss._cc.congestion_window = max(loss._cc.congestion_window, min(K_INITIAL_WINDOW * size, max(14720, 2 * size)))


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
                 "_crypto_buffers", "_handshake_confirmed", "_max_datagram_size", "_packet_number", "_cryptos",
                 "_network_paths", "_peer_cid", "_peer_token", "_spin_bit", "_version", "_state"):
        if not hasattr(connection, name):
            missing.append(f"aioquic QuicConnection.{name}")
    from aioquic.quic.recovery import QuicPacketSpace

    if not hasattr(QuicPacketSpace(), "ack_at"):
        missing.append("aioquic QuicPacketSpace.ack_at")
    builder = QuicPacketBuilder(host_cid=b"", is_client=True, max_datagram_size=1200, peer_cid=b"", version=1)
    if not hasattr(builder, "_datagram_needs_padding"):
        missing.append("aioquic QuicPacketBuilder._datagram_needs_padding")
    loss = getattr(connection, "_loss", None)
    for name in ("_rtt_smoothed", "_rtt_initialized", "_on_packets_lost", "_cc"):
        if not hasattr(loss, name):
            missing.append(f"aioquic QuicPacketRecovery.{name}")
    if not hasattr(getattr(loss, "_cc", None), "_max_datagram_size"):
        missing.append("aioquic QuicPacketRecovery._cc._max_datagram_size")
    return missing
