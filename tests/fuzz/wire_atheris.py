"""Coverage-guided fuzzing of every wire decoder with atheris (libFuzzer): any bytes, split anywhere,
may raise only ProtocolError. Run by tests/test_wire_atheris.py; by hand for longer:

    python tests/fuzz/wire_atheris.py -max_total_time=600
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from quicmesh.protocol import wire
    from quicmesh.pubsub import frames as pubsub_frames
    from quicmesh.durable import frame as durable_frame
    from quicmesh.membership import announcement as membership_announcement
    from quicmesh.membership import messages as membership_messages
    from quicmesh.nat import frame as nat_frame
    from quicmesh.errors import ProtocolError


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 18)
    cut = fdp.ConsumeIntInRange(0, 64)
    end = fdp.ConsumeBool()
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    chunks = [payload[:cut], payload[cut:]]
    try:
        if target == 0:
            wire.decode_datagram(payload)
        elif target == 1:
            wire.read_stream_type(payload, bidirectional=end)
        elif target == 6:
            wire.decode_datagram_batch(payload)
        elif target == 14:  # durable: the DURABLE feature message body
            durable_frame.decode_durable(payload)
        elif target >= 17:  # NAT: a NAT feature request body, an address answer
            (nat_frame.decode_request, nat_frame.decode_address)[target - 17](payload)
        elif target >= 15:  # membership: a signed announcement, a MEMBERSHIP message body
            (membership_announcement.decode_announcement, membership_messages.decode_message)[target - 15](payload)
        elif target >= 12:  # relay: RELAY_UP/RELAY_DOWN datagrams, relay messages
            (wire.decode_relay_datagram, wire.decode_relay_message)[target - 12](payload)
        elif target >= 10:  # FEATURE_MESSAGE / FEATURE_REQUEST stream bodies
            decoder = (wire.FeatureMessageDecoder, wire.FeatureRequestDecoder)[target - 10](4096)
            decoder.feed(chunks[0], False)
            decoder.feed(chunks[1], end)
        elif target >= 7:  # pub/sub: PUBLISH datagram, feature message and request bodies (Interest: target 2)
            (pubsub_frames.decode_publish_datagram, pubsub_frames.decode_publish_message,
             pubsub_frames.decode_subject_request)[target - 7](payload)
        elif target == 2:
            decoder = wire.ControlDecoder()
            for chunk in chunks:
                decoder.feed(chunk)
        else:  # 3..5
            decoder = (wire.MessageDecoder, wire.RequestDecoder, wire.ResponseDecoder)[target - 3](4096)
            decoder.feed(chunks[0], False)
            decoder.feed(chunks[1], end)
    except ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
