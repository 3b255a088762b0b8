"""Every way a peer must be refused, asserted on both sides with its reason (real handshakes)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

from meshkit import TerminationWatch, make_mesh, wait_rejection
from pki.authority import CertificateAuthority, issue_node_cert
from quicmesh import Node
from quicmesh.config import Config
from quicmesh.protocol.wire import ALPN


async def raw_client_refused(node: Node, ca_path: Path, cert_dir: Path | None) -> str:
    """Dial ``node`` with plain aioquic (optionally with a client cert); return the close reason it got."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_REQUIRED)
    configuration.load_verify_locations(cafile=str(ca_path))
    configuration.server_name = None
    if cert_dir is not None:
        configuration.load_cert_chain(cert_dir / "node.crt", cert_dir / "node.key")
    assert node.listen_address is not None
    async with asyncio.timeout(5):
        try:
            async with connect("127.0.0.1", node.listen_address[1], configuration=configuration,
                               create_protocol=TerminationWatch, wait_connected=True) as protocol:
                event = await protocol.terminated
                return event.reason_phrase
        except ConnectionError as error:
            return str(error)


@pytest.fixture
def mesh(tmp_path: Path) -> dict[str, Config]:
    return make_mesh(tmp_path / "mesh", ["alpha", "beta", "gamma"])


async def test_client_without_certificate_is_refused(mesh: dict[str, Config], tmp_path: Path) -> None:
    async with Node(mesh["beta"]) as beta:
        reason = await raw_client_refused(beta, tmp_path / "mesh" / "ca" / "ca.crt", None)
        assert "client certificate is required" in reason
        await wait_rejection(beta, "no client certificate")


async def test_client_certificate_from_another_ca_is_refused(mesh: dict[str, Config], tmp_path: Path) -> None:
    make_mesh(tmp_path / "foreign", ["alpha", "beta"])  # same mesh and node names, another CA
    async with Node(mesh["beta"]) as beta:
        reason = await raw_client_refused(beta, tmp_path / "mesh" / "ca" / "ca.crt", tmp_path / "foreign" / "alpha")
        assert "mesh CA" in reason or "issuer" in reason, reason
        assert reason == (await wait_rejection(beta, "rejected peer certificate")).split(": ", 1)[1]


async def test_expired_client_certificate_is_refused(tmp_path: Path) -> None:
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    mesh = make_mesh(tmp_path / "old", ["alpha", "beta"], now=long_ago, days=1000)  # CA and beta still valid
    ca = CertificateAuthority.open(tmp_path / "old" / "ca")
    issue_node_cert(ca, "alpha", tmp_path / "expired", days=30, now=long_ago)
    async with Node(mesh["beta"]) as beta:
        reason = await raw_client_refused(beta, tmp_path / "old" / "ca" / "ca.crt", tmp_path / "expired")
        assert "expired" in reason
        await wait_rejection(beta, "expired")


async def test_revoked_peer_is_refused_both_ways(mesh: dict[str, Config], tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pki.cli", "revoke", "alpha", "--ca-dir", str(tmp_path / "mesh" / "ca")],
        check=True, capture_output=True,
    )
    alpha_config = dataclasses.replace(mesh["alpha"], tls=dataclasses.replace(mesh["alpha"].tls, crl=None))
    async with Node(alpha_config) as alpha, Node(mesh["beta"]) as beta:
        assert "revoked" in await wait_rejection(beta, "revoked")
        assert "revoked" in await wait_rejection(alpha, "refused")
        async with asyncio.timeout(5):  # beta's own dial to alpha (after alpha's head start) fails too
            while "revoked" not in ((beta_view := {p.name: p for p in beta.peers()}["alpha"]).last_error or ""):
                await asyncio.sleep(0.05)
        assert beta_view.state in ("rejected", "connecting")
        assert "alpha" not in beta.connected_peers() and "beta" not in alpha.connected_peers()


async def test_other_node_answering_at_a_peers_address_is_refused(mesh: dict[str, Config]) -> None:
    wrong = dataclasses.replace(mesh["alpha"].peer("beta"), address=mesh["gamma"].node.listen)  # type: ignore[arg-type]
    others = tuple(peer for peer in mesh["alpha"].peers if peer.name != "beta")
    alpha_config = dataclasses.replace(mesh["alpha"], peers=(wrong, *others))
    gamma_config = dataclasses.replace(mesh["gamma"], peers=())  # gamma does not dial alpha itself
    async with Node(alpha_config) as alpha, Node(gamma_config) as gamma:
        reason = await wait_rejection(alpha, "beta")
        assert "gamma" in reason and "beta" in reason
        assert "gamma" in await wait_rejection(gamma, "refused")
        assert alpha.connected_peers() == []


async def test_node_of_another_mesh_is_refused(mesh: dict[str, Config], tmp_path: Path) -> None:
    stranger = make_mesh(tmp_path / "other", ["beta", "zeta"], mesh="other")["beta"]
    alpha_config = dataclasses.replace(
        mesh["alpha"],
        peers=(dataclasses.replace(mesh["alpha"].peer("beta"), address=stranger.node.listen),),  # type: ignore[arg-type]
    )
    stranger = dataclasses.replace(stranger, peers=())
    async with Node(alpha_config) as alpha, Node(stranger) as impostor:
        reason = await wait_rejection(alpha, "rejected peer certificate")
        assert reason
        await wait_rejection(impostor, "refused")
        assert alpha.connected_peers() == []

