"""This node's certificate, key and trust policy, and the QUIC configuration built from them."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509

from quicmesh.config import Config, PeerConfig
from quicmesh.errors import IdentityError, IdentityMismatchError
from quicmesh.protocol import identity, wire


class Credentials:
    """Loaded from the config's [tls] files; a reload loads a new instance (the old one stays valid for the
    connections verified with it until they are re-checked)."""

    def __init__(self, config: Config) -> None:
        """Read cert, key, CA and CRL, and check that our own certificate is one the peers will accept."""
        chain = identity.load_certificates(config.tls.cert)
        key = identity.load_private_key(config.tls.key)
        trust = identity.TrustPolicy.from_files(
            config.tls.ca, config.node.mesh, crl_path=config.tls.crl, denylist=config.tls.denylist
        )
        try:
            trust.verify(chain, expect_node=config.node.name)
        except IdentityError as error:
            raise IdentityError(f"this node's own certificate {config.tls.cert} is unusable: {error}") from None
        with open(config.tls.ca, "rb") as file:
            self.ca_pem = file.read()
        self.chain: list[x509.Certificate] = chain
        self._key: Any = key
        self.trust = trust
        self.node_name = config.node.name

    @property
    def fingerprint(self) -> str:
        return identity.fingerprint(self.chain[0])

    def quic_configuration(self, config: Config, *, is_client: bool, packet_size: int | None = None) -> QuicConfiguration:
        """``packet_size``: the QUIC packet size, when not the config's (a relayed connection's is smaller)."""
        size = packet_size or config.limits.max_datagram_size
        configuration = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[wire.ALPN],
            max_datagram_frame_size=size,
            max_datagram_size=size,
            idle_timeout=max(30.0, config.timers.dead_after * 4),
            verify_mode=ssl.CERT_REQUIRED,
            cadata=self.ca_pem,  # the mesh CA only: never the system roots
        )
        configuration.certificate = self.chain[0]
        configuration.certificate_chain = self.chain[1:]
        configuration.private_key = self._key
        return configuration

    def verify_peer(self, chain: Sequence[x509.Certificate], expect: str | None,
                    peers: dict[str, PeerConfig], *, open_membership: bool = False) -> tuple[str, str]:
        """Check a peer's chain against the mesh CA, CRL, the known peers and their pins: (node name,
        fingerprint). ``expect``: the peer we dialed (None: an inbound connection, or a seed dialed by address).
        ``open_membership`` ([mesh] members = "any-certified"): any node of this mesh but this one's own name."""
        if expect is not None:
            config = peers.get(expect)
            found = self.trust.verify(chain, expect_node=expect, pin=config.fingerprint if config else None)
        elif open_membership:
            found = self.trust.verify(chain)
            if found.node == self.node_name:
                raise IdentityMismatchError(f"certificate is for this node's own name {found.node!r}")
            config = peers.get(found.node)
            if config is not None and config.fingerprint is not None:
                found = self.trust.verify(chain, expect_node=found.node, pin=config.fingerprint)
        else:
            found = self.trust.verify(chain, allowed_nodes=peers.keys())
            pin = peers[found.node].fingerprint
            if pin is not None:
                found = self.trust.verify(chain, expect_node=found.node, pin=pin)
        return found.node, identity.fingerprint(chain[0])

    def announcement(self, **fields: Any) -> Any:
        """This node's membership announcement, signed with its key and carrying its chain (the key stays here)."""
        from quicmesh.membership.announcement import sign_announcement

        return sign_announcement(chain=self.chain, key=self._key, **fields)
