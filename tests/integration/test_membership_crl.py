"""Bad CRLs handed to a node (``quicmesh crl push``, or a peer's Crl message) are refused with a reason and
counted; the node keeps its CRL and keeps running."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from meshkit import make_mesh

from quicmesh.membership.feature import MembershipFeature
from quicmesh.runtime.node import Node


async def test_junk_and_stale_crls_are_refused_with_a_reason(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path, ["alpha", "beta"])
    node = Node(configs["alpha"])
    await node.start()
    try:
        feature = node.features.find(MembershipFeature)
        assert feature is not None
        before = feature.crl_number()
        for junk in (b"", b"\x30\x03\x02\x01\x01", bytes(range(256)) * 4):
            answer = feature.publish_crl(junk)
            assert answer["applied"] is False and str(answer["reason"]).startswith("not a DER CRL")
        assert configs["alpha"].tls.crl is not None
        current = x509.load_pem_x509_crl(configs["alpha"].tls.crl.read_bytes())
        stale = feature.publish_crl(current.public_bytes(Encoding.DER))
        assert stale["applied"] is False and "is not newer than" in str(stale["reason"])
        assert feature.crl_number() == before and feature.crls_rejected == 3
        assert node.features.running
    finally:
        await node.stop()

