"""The quicmesh wire format: encoders and incremental decoders. docs/PROTOCOL.md is the spec.

Pure: no I/O, no aioquic. Decoders take whatever chunks QUIC delivers and raise only
:class:`~quicmesh.errors.ProtocolError` (carrying the :class:`ErrorCode` to close or reset with) on bad
input, so a hostile peer can never crash a node. Encoders take values this node produced; an out-of-range
value there is a local bug and raises ``ValueError``.

Stream rule: every stream starts with a varint :class:`StreamType`. The receiver buffers a new stream's
first bytes until :func:`read_stream_type` returns ``(type, consumed)``, then feeds the REST (from
``consumed`` on) to the decoder for that type. Decoders never see the stream type; encoders of a whole
stream (:func:`encode_message`, :func:`encode_request`) include it. A response has no type prefix.

Submodules, by concern (every public name is re-exported here: use ``wire.X``):

- :mod:`~quicmesh.protocol.wire.common`: ALPN, PROTOCOL_VERSION, limits, the code enums (ErrorCode,
  DatagramKind, Feature, StreamType, ResponseStatus, FrameType), varints, the payload reader;
- :mod:`~quicmesh.protocol.wire.datagrams`: APP/FORWARD/FORWARD_REPLY datagrams and BATCH datagrams;
- :mod:`~quicmesh.protocol.wire.streams`: the stream type prefix, message/request/response encoders and
  body decoders;
- :mod:`~quicmesh.protocol.wire.control`: the control frames, encode_frame and ControlDecoder;
- :mod:`~quicmesh.protocol.wire.relay`: RELAY_UP/RELAY_DOWN datagrams and the relay messages (Connect, Offer,
  Close, Reach: import them from the submodule, their names are generic).
"""

from __future__ import annotations

from quicmesh.protocol.wire.common import (
    ALPN,
    DATAGRAM_OVERHEAD,
    FEATURES,
    FORWARD_HEADER_MAX,
    MAX_ACK_IDS,
    MAX_CONTROL_FRAME_PAYLOAD,
    MAX_FLOW_ID,
    MAX_QUEUE_GROUP_BYTES,
    MAX_REASON_BYTES,
    MAX_SERVICE_ID,
    MAX_SERVICE_NAME_BYTES,
    MAX_SERVICES,
    MAX_SUBJECT_BYTES,
    MAX_VARINT,
    PROTOCOL_VERSION,
    DatagramKind,
    ErrorCode,
    Feature,
    FeatureTag,
    FrameType,
    InterestOp,
    ResponseStatus,
    StreamType,
    decode_node_name,
    decode_varint,
    encode_node_name,
    encode_varint,
)
from quicmesh.protocol.wire.control import (
    Ack,
    ControlDecoder,
    Frame,
    GoAway,
    Hello,
    Interest,
    Reject,
    Services,
    encode_frame,
)
from quicmesh.protocol.wire.datagrams import (
    app_batch_entry,
    batch_entry,
    decode_datagram,
    decode_datagram_batch,
    encode_app_datagram,
    encode_datagram_batch,
    encode_forward_datagram,
    encode_forward_reply_datagram,
    unbatch_entry,
)
from quicmesh.protocol.wire.relay import (
    MAX_CIRCUIT_ID,
    MAX_REACH_ENTRIES,
    RELAY_HEADER_MAX,
    RelayMessage,
    RelayOp,
    decode_relay_datagram,
    decode_relay_message,
    encode_relay_datagram,
    encode_relay_message,
)
from quicmesh.protocol.wire.streams import (
    FeatureMessageDecoder,
    FeatureRequestDecoder,
    MessageDecoder,
    RequestDecoder,
    ResponseDecoder,
    encode_feature_message,
    encode_feature_request,
    encode_message,
    encode_request,
    encode_response,
    encode_stream_type,
    read_stream_type,
)

__all__ = [
    "MAX_CIRCUIT_ID",
    "MAX_REACH_ENTRIES",
    "RELAY_HEADER_MAX",
    "RelayMessage",
    "RelayOp",
    "decode_relay_datagram",
    "decode_relay_message",
    "encode_relay_datagram",
    "encode_relay_message",
    "ALPN",
    "PROTOCOL_VERSION",
    "DATAGRAM_OVERHEAD",
    "MAX_VARINT",
    "MAX_CONTROL_FRAME_PAYLOAD",
    "MAX_REASON_BYTES",
    "MAX_ACK_IDS",
    "ErrorCode",
    "DatagramKind",
    "FEATURES",
    "Feature",
    "FeatureTag",
    "StreamType",
    "ResponseStatus",
    "FrameType",
    "encode_varint",
    "decode_varint",
    "encode_node_name",
    "decode_node_name",
    "encode_app_datagram",
    "encode_forward_datagram",
    "encode_forward_reply_datagram",
    "app_batch_entry",
    "batch_entry",
    "unbatch_entry",
    "decode_datagram",
    "decode_datagram_batch",
    "encode_datagram_batch",
    "encode_stream_type",
    "read_stream_type",
    "encode_message",
    "encode_request",
    "encode_response",
    "encode_feature_message",
    "encode_feature_request",
    "MessageDecoder",
    "RequestDecoder",
    "FeatureMessageDecoder",
    "FeatureRequestDecoder",
    "ResponseDecoder",
    "Hello",
    "Ack",
    "Reject",
    "GoAway",
    "Services",
    "MAX_SERVICE_ID",
    "MAX_FLOW_ID",
    "FORWARD_HEADER_MAX",
    "MAX_SERVICE_NAME_BYTES",
    "MAX_SERVICES",
    "Interest",
    "InterestOp",
    "MAX_SUBJECT_BYTES",
    "MAX_QUEUE_GROUP_BYTES",
    "Frame",
    "encode_frame",
    "ControlDecoder",
]
