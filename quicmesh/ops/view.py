"""The node as ops sees it: what the control socket, the status document and the metrics read or call.

A ``quicmesh.Node`` satisfies it. Typed here, with the node's types imported only for type checkers, so
that the client commands which import ops modules never load the node (nor aioquic, nor cryptography).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from quicmesh import PeerStatus
    from quicmesh.runtime.features import FeatureHost


class NodeView(Protocol):
    """What ops reads from, and asks of, a running node."""

    @property
    def name(self) -> str: ...

    @property
    def mesh(self) -> str: ...

    @property
    def listen_address(self) -> tuple[str, int] | None: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def cert_not_after(self) -> datetime: ...

    @property
    def ca_not_after(self) -> datetime: ...

    @property
    def rejections(self) -> Iterable[tuple[float, str, str]]:
        """The latest handshake rejections, either way: (unix time, address, reason)."""

    @property
    def rejection_count(self) -> int: ...

    @property
    def features(self) -> FeatureHost:
        """The plugged-in features: status reads the UDP forwarder's counters through it."""

    def peers(self) -> list[PeerStatus]: ...

    def socket_counters(self) -> dict[str, int]: ...

    def guard_status(self) -> dict[str, Any] | None: ...

    def send_datagram(self, peer: str, data: bytes) -> None: ...

    async def send(self, peer: str, data: bytes) -> None: ...

    async def request(self, peer: str, data: bytes, timeout: float = 5.0) -> bytes: ...

    async def ping(self, peer: str, timeout: float = 5.0) -> float: ...
