"""A foreign QUIC stack (qh3, its own Rust-based TLS) dialing a real node: refused cleanly, unless it is a peer.

The refusals are asserted on the TLS alert the node sends (QUIC crypto error codes 0x100 + alert); the
positive control proves qh3 can complete a handshake with a node at all, so the refusals are not plain
incompatibility between the two stacks.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from qh3.asyncio.client import connect
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent

from meshkit import make_mesh, wait_rejection, with_timers
from pki.authority import CertificateAuthority
from quicmesh import Node
from quicmesh.config import Config
from quicmesh.protocol.wire import ALPN

CRYPTO_ERROR = range(0x100, 0x200)  # QUIC CRYPTO_ERROR: 0x100 + the TLS alert
CERTIFICATE_REQUIRED = 0x100 + 116
NO_APPLICATION_PROTOCOL = 0x100 + 120


class ForeignWatch(QuicConnectionProtocol):
    """A qh3 client protocol recording whether its handshake completed and how its connection ended."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[HandshakeCompleted] = loop.create_future()
        self.terminated: asyncio.Future[ConnectionTerminated] = loop.create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted) and not self.handshake.done():
            self.handshake.set_result(event)
        elif isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        super().quic_event_received(event)


@dataclass
class Outcome:
    handshake: HandshakeCompleted | None
    terminated: ConnectionTerminated | None


def qh3_configuration(ca: Path, alpn: str, cert_dir: Path | None) -> QuicConfiguration:
    """A qh3 client that fully verifies the node: the mesh CA as its only anchor, the node's IP SAN."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_REQUIRED)
    configuration.load_verify_locations(cafile=str(ca))
    configuration.server_name = "127.0.0.1"  # the node certs carry IP:127.0.0.1; hostname checks stay on
    assert configuration.verify_hostname
    configuration.initial_rtt = 0.05  # loopback: qh3 otherwise drains a refused handshake for ~2 s
    if cert_dir is not None:
        configuration.load_cert_chain(cert_dir / "node.crt", cert_dir / "node.key")
    return configuration


async def dial_with_qh3(node: Node, configuration: QuicConfiguration) -> Outcome:
    """Dial ``node`` with qh3; wait (bounded) for the connection to end; whether TLS completed and how it ended."""
    assert node.listen_address is not None
    async with asyncio.timeout(5):
        async with connect("127.0.0.1", node.listen_address[1], configuration=configuration,
                           create_protocol=ForeignWatch, wait_connected=False) as protocol:
            assert isinstance(protocol, ForeignWatch)
            await protocol.terminated
            return Outcome(
                protocol.handshake.result() if protocol.handshake.done() else None,
                protocol.terminated.result() if protocol.terminated.done() else None,
            )


@pytest.fixture
def mesh(tmp_path: Path) -> dict[str, Config]:
    return make_mesh(tmp_path / "mesh", ["alpha", "beta"])


async def test_qh3_client_without_certificate_is_refused(mesh: dict[str, Config]) -> None:
    async with Node(mesh["alpha"]) as alpha, Node(mesh["beta"]) as beta:
        await beta.wait_connected(timeout=5)
        outcome = await dial_with_qh3(beta, qh3_configuration(mesh["beta"].tls.ca, ALPN, None))
        assert outcome.terminated is not None
        assert outcome.terminated.error_code in CRYPTO_ERROR, outcome.terminated
        assert outcome.terminated.error_code == CERTIFICATE_REQUIRED, outcome.terminated
        await wait_rejection(beta, "no client certificate")
        # The node kept serving its mesh through the refusal.
        async with asyncio.timeout(5):
            await alpha.send("beta", b"x")
            assert (await beta.recv()).data == b"x"
        assert beta.connected_peers() == ["alpha"]


async def test_qh3_client_with_wrong_alpn_is_refused(mesh: dict[str, Config]) -> None:
    async with Node(mesh["beta"]) as beta:
        configuration = qh3_configuration(mesh["beta"].tls.ca, "h3", mesh["alpha"].tls.cert.parent)
        outcome = await dial_with_qh3(beta, configuration)
        assert outcome.handshake is None
        assert outcome.terminated is not None
        assert outcome.terminated.error_code == NO_APPLICATION_PROTOCOL, outcome.terminated
        await wait_rejection(beta, "ALPN")


async def test_qh3_client_with_certificate_from_another_ca_is_refused(
    mesh: dict[str, Config], tmp_path: Path
) -> None:
    make_mesh(tmp_path / "foreign", ["alpha", "beta"])  # same mesh and node names, another CA
    assert CertificateAuthority.open(tmp_path / "foreign" / "ca").cert != \
        CertificateAuthority.open(tmp_path / "mesh" / "ca").cert
    async with Node(mesh["beta"]) as beta:
        configuration = qh3_configuration(mesh["beta"].tls.ca, ALPN, tmp_path / "foreign" / "alpha")
        outcome = await dial_with_qh3(beta, configuration)
        assert outcome.terminated is not None
        assert outcome.terminated.error_code in CRYPTO_ERROR, outcome.terminated
        assert "foreign CA" in outcome.terminated.reason_phrase or "issuer" in outcome.terminated.reason_phrase
        await wait_rejection(beta, "rejected peer certificate")


async def test_qh3_client_with_peer_certificate_completes_handshake(mesh: dict[str, Config]) -> None:
    """Positive control: with a configured peer's credentials and the mesh ALPN, qh3 gets through TLS.

    qh3 never sends quicmesh's Hello, so the node closes it after its handshake timeout, but not with a
    TLS error: the refusals above are the node's checks, not an incompatibility between the two stacks.
    """
    async with Node(with_timers(mesh["beta"], handshake_timeout=1.0)) as beta:
        configuration = qh3_configuration(mesh["beta"].tls.ca, ALPN, mesh["alpha"].tls.cert.parent)
        outcome = await dial_with_qh3(beta, configuration)
        assert outcome.handshake is not None, outcome.terminated
        assert outcome.handshake.alpn_protocol == ALPN
        assert outcome.terminated is not None
        assert outcome.terminated.error_code not in CRYPTO_ERROR, outcome.terminated
