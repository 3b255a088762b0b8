"""The connection state machine (runtime/connection.py) against a reference model written from its
docstring table, on a Connection over a real aioquic connection."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshkit import QuicPair, RecordingQuic, ready_connection

from quicmesh.protocol import wire
from quicmesh.runtime.connection import (
    TRANSITIONS,
    Connection,
    ConnectionState,
    InvalidTransitionError,
    Transition,
)
from quicmesh.transport.endpoint import Link

S, T = ConnectionState, Transition
OPEN = (S.HANDSHAKING, S.VERIFIED, S.READY, S.RETIRING)


def expected_move(state: ConnectionState, event: Transition) -> ConnectionState | None:
    """The docstring's table, written out independently of TRANSITIONS: the next state, None if refused."""
    if event is T.TERMINATED:
        return S.CLOSED  # from any state
    if event is T.CLOSE:
        return S.CLOSING if state in OPEN else None
    return {(S.HANDSHAKING, T.VERIFIED): S.VERIFIED, (S.VERIFIED, T.HELLO): S.READY,
            (S.READY, T.RETIRE): S.RETIRING}.get((state, event))


QUIC = RecordingQuic()  # transitions never touch the QUIC connection: one serves every example


def new_connection(quic: RecordingQuic = QUIC) -> Connection:
    return Connection(Link(conn_id=7, quic=quic, dialed=True))


def test_table_matches_the_documented_moves_for_every_pair() -> None:
    for state in S:
        for event in T:
            assert TRANSITIONS.get((state, event)) == expected_move(state, event), (state, event)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(T)), max_size=30))
def test_any_sequence_of_events_follows_the_model(events: list[Transition]) -> None:
    connection = new_connection()
    model = S.HANDSHAKING
    for event in events:
        expected = expected_move(model, event)
        if expected is None:
            with pytest.raises(InvalidTransitionError):
                connection.transition(event)
            assert connection.state is model  # a refused move leaves the state as it was
        else:
            assert connection.transition(event) is expected
            model = expected
        assert connection.state is model
        assert connection.usable == (model in (S.READY, S.RETIRING))
        assert connection.closing == (model in (S.CLOSING, S.CLOSED))


@pytest.mark.parametrize("event", [e for e in T if e is not T.TERMINATED])
def test_closed_is_terminal_except_for_terminated(event: Transition) -> None:
    connection = new_connection()
    connection.transition(T.TERMINATED)
    with pytest.raises(InvalidTransitionError, match=f"connection 7: no transition from closed on {event.value}"):
        connection.transition(event)
    assert connection.state is S.CLOSED
    assert connection.transition(T.TERMINATED) is S.CLOSED


def test_closing_takes_no_second_close_and_ends_closed() -> None:
    connection = new_connection()
    connection.transition(T.CLOSE)
    with pytest.raises(InvalidTransitionError):
        connection.transition(T.CLOSE)
    assert connection.closing and not connection.usable
    assert connection.transition(T.TERMINATED) is S.CLOSED


def test_a_ready_connection_stops_being_usable_once_its_link_is_gone() -> None:
    connection = ready_connection(RecordingQuic(), "beta", epoch=1)
    assert connection.usable
    connection.link.terminated = True  # aioquic reported it gone, before the runtime's TERMINATED
    assert not connection.usable
    assert not connection.closing


def test_send_control_writes_frames_on_the_control_stream_only_while_the_link_lives() -> None:
    quic = RecordingQuic()
    connection = new_connection(quic)
    connection.send_control(wire.Ack((1,)))
    assert quic.stream_writes == []  # no control stream yet
    ready = ready_connection(quic, "beta", epoch=1)
    ready.send_control(wire.Ack((1, 2)))
    assert quic.stream_writes[1:] == [(ready.control_stream, wire.encode_frame(wire.Ack((1, 2))), False)]
    ready.link.terminated = True
    ready.send_control(wire.Ack((3,)))
    assert len(quic.stream_writes) == 2


def test_a_real_mutual_tls_handshake_walks_the_table(tmp_path: Path) -> None:
    pair = QuicPair(tmp_path)
    connection = Connection(Link(conn_id=1, quic=pair.client, dialed=True))
    assert connection.quic is pair.client and connection.conn_id == 1
    client_events, _ = pair.exchange()
    assert any(type(event).__name__ == "HandshakeCompleted" for event in client_events)
    assert pair.client.verified_peer is not None and pair.client.verified_peer[0] == "beta"
    assert connection.transition(T.VERIFIED) is S.VERIFIED
    assert not connection.usable  # nothing flows before the peer's Hello
    assert connection.transition(T.HELLO) is S.READY and connection.usable
    assert connection.transition(T.RETIRE) is S.RETIRING and connection.usable
    assert connection.transition(T.CLOSE) is S.CLOSING and connection.closing and not connection.usable
    pair.client.close(error_code=0, reason_phrase="done")
    pair.exchange()
    assert connection.transition(T.TERMINATED) is S.CLOSED
