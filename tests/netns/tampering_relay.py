"""`quicmesh run` as a hostile relay: every packet it relays has one bit flipped.

    python tampering_relay.py run -c node.toml
    TAMPER_WHEN_EXISTS=FILE python tampering_relay.py run -c node.toml   # only while FILE exists

The adversary is the relay, not the node under test: this process patches its own relay feature so that each
RELAY_UP packet it forwards goes on with the last byte's lowest bit flipped (inside the AEAD tag of the
datagram's last QUIC packet), then runs the ordinary daemon. With ``TAMPER_WHEN_EXISTS``, it relays faithfully
until that file appears (so the end nodes first connect through it, then see tampered packets). The end nodes are unmodified; they must refuse
what arrives. Logs one line per 100 tampered packets, so a test can see the tampering really happened.
"""

from __future__ import annotations

import logging
import os
import sys

from quicmesh.cli import main
from quicmesh.protocol import wire
from quicmesh.relay.feature import RelayFeature

log = logging.getLogger("tampering_relay")
_forward = RelayFeature.datagram_received
_tampered = 0
_switch = os.environ.get("TAMPER_WHEN_EXISTS")


def _flip_last_bit(self: RelayFeature, peer: str, datagram: bytes) -> None:
    global _tampered
    kind, circuit, packet = wire.decode_relay_datagram(datagram)
    if kind == wire.DatagramKind.RELAY_UP and (_switch is None or os.path.exists(_switch)):
        packet = packet[:-1] + bytes((packet[-1] ^ 0x01,))
        datagram = wire.encode_relay_datagram(wire.DatagramKind.RELAY_UP, circuit, packet)
        _tampered += 1
        if _tampered % 100 == 1:
            log.warning("tampered with %d relayed packets", _tampered)
    _forward(self, peer, datagram)


RelayFeature.datagram_received = _flip_last_bit  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
