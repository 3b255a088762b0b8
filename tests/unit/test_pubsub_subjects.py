"""Subjects (pure parts): syntax, the trie against a simple reference matcher, permissions' coverage,
interest bookkeeping, the pub/sub wire and its decoders under hostile bytes, and the [pubsub] config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.config import parse_config, render_config
from quicmesh.errors import ConfigError, InvalidSubjectError, ProtocolError
from quicmesh.protocol import wire
from quicmesh.pubsub import frames
from quicmesh.pubsub.interest import LocalInterest, RemoteInterest, TokenBucket
from quicmesh.pubsub.subjects import SubjectTrie, covers, validate_group, validate_pattern, validate_subject

FAST = settings(max_examples=200, deadline=None)

# Few distinct tokens, so that random patterns and subjects actually meet.
tokens = st.sampled_from(["a", "b", "c", "orders", "eu"])
subjects = st.lists(tokens, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(tokens, st.just("*")), min_size=1, max_size=5))
    if draw(st.booleans()):
        parts.append(">")
    return ".".join(parts)


def reference_match(pattern: str, subject: str) -> bool:
    """NATS matching as a regular expression: '*' one token, a final '>' one or more."""
    parts = pattern.split(".")
    regex = r"\.".join("[^.]+" if p == "*" else ".+" if p == ">" else re.escape(p) for p in parts)
    return re.fullmatch(regex, subject) is not None


@FAST
@given(st.lists(patterns(), max_size=30), subjects)
def test_trie_matches_like_the_reference(filed: list[str], subject: str) -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    for pattern in filed:
        trie.add(pattern, pattern)
    assert trie.match(subject) == {p for p in filed if reference_match(p, subject)}


@FAST
@given(st.lists(patterns(), max_size=20), st.lists(patterns(), max_size=20), subjects)
def test_trie_removal_leaves_exactly_the_rest(kept: list[str], removed: list[str], subject: str) -> None:
    trie: SubjectTrie[tuple[str, str]] = SubjectTrie()
    for pattern in kept:
        trie.add(pattern, ("kept", pattern))
    for pattern in removed:
        trie.add(pattern, ("gone", pattern))
    for pattern in removed:
        assert trie.remove(pattern, ("gone", pattern)) or removed.count(pattern) > 1
    assert trie.match(subject) == {("kept", p) for p in kept if reference_match(p, subject)}
    assert len(trie) == len(set(kept))
    assert sorted(trie.patterns()) == sorted({(p, ("kept", p)) for p in kept})


def test_an_emptied_trie_keeps_no_branches() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    for i, pattern in enumerate(["a.b.c", "a.*.c", "a.>", ">", "*"]):
        trie.add(pattern, i)
    for i, pattern in enumerate(["a.b.c", "a.*.c", "a.>", ">", "*"]):
        assert trie.remove(pattern, i)
    assert not trie.remove("a.b.c", 0)
    assert trie._root.empty() and len(trie) == 0


@FAST
@given(patterns(), patterns(), subjects)
def test_covers_means_every_matching_subject_is_allowed(allowed: str, pattern: str, subject: str) -> None:
    if covers(allowed, pattern) and reference_match(pattern, subject):
        assert reference_match(allowed, subject)
    if covers(allowed, pattern):  # and is exact for concrete subjects
        assert covers(allowed, pattern.replace("*", "x").replace(">", "y")) or ">" in pattern or "*" in pattern
    assert covers(allowed, subject) == reference_match(allowed, subject)


@pytest.mark.parametrize("pattern, wanted, ok", [
    (">", "anything.at.all", True), ("orders.>", "orders.*", True), ("orders.>", "orders", False),
    ("orders.*", "orders.>", False), ("*.created", "orders.created", True), ("a.b", "a.*", False),
])
def test_covers_examples(pattern: str, wanted: str, ok: bool) -> None:
    assert covers(pattern, wanted) is ok


@pytest.mark.parametrize("bad, needle", [
    ("", "empty"), ("a..b", "empty token"), (".a", "empty token"), ("a.", "empty token"),
    ("a b", "whitespace"), ("a\tb", "whitespace"), ("a\x00b", "control"), ("a.>.b", "last token"),
    ("ord*", "whole token"), ("a.b>", "whole token"), ("x" * 257, "longer than 256"), ("a\udc80", "Unicode"),
])
def test_bad_patterns_are_refused_with_the_reason(bad: str, needle: str) -> None:
    with pytest.raises(InvalidSubjectError, match=needle):
        validate_pattern(bad)


def test_subjects_take_no_wildcards_and_groups_no_dots() -> None:
    assert validate_subject("orders.eu.created") == "orders.eu.created"
    assert validate_pattern("orders.*.>") == "orders.*.>"
    with pytest.raises(InvalidSubjectError, match="wildcard"):
        validate_subject("orders.*")
    for bad in ("", "a.b", "a*", "a b", "g" * 65, 7):
        with pytest.raises(InvalidSubjectError):
            validate_group(bad)
    assert validate_group("workers-1") == "workers-1"
    with pytest.raises(InvalidSubjectError, match="string"):
        validate_subject(b"bytes")


# --- interest -----------------------------------------------------------------------------------
def test_local_interest_coalesces_changes_and_resets_everything() -> None:
    local = LocalInterest()
    local.add(("a.*", ""))
    local.add(("a.*", ""))  # a second subscriber: still one entry
    local.add(("b", "w"))
    frames_ = local.changes()
    assert [(f.op, f.entries) for f in frames_] == [(wire.InterestOp.ADD, (("a.*", ""), ("b", "w")))]
    local.remove(("a.*", ""))  # one of two left
    local.add(("c", ""))
    local.remove(("c", ""))  # came and went before a flush: nothing to say
    assert local.changes() == []
    local.remove(("a.*", ""))
    assert [(f.op, f.entries) for f in local.changes()] == [(wire.InterestOp.REMOVE, (("a.*", ""),))]
    reset = local.reset()
    assert [(f.op, f.entries) for f in reset] == [(wire.InterestOp.RESET, (("b", "w"),))]
    seqs = [f.seq for f in [*frames_, *reset]]
    assert seqs == sorted(set(seqs))


def test_a_large_reset_is_split_into_frames_that_encode() -> None:
    local = LocalInterest()
    for i in range(1000):
        local.add((f"s{i}." + "x" * 200, "g" * 60))
    reset = local.reset()
    assert reset[0].op == wire.InterestOp.RESET and all(f.op == wire.InterestOp.ADD for f in reset[1:])
    assert sum(len(f.entries) for f in reset) == 1000
    for frame in reset:
        assert len(wire.encode_frame(frame)) <= wire.MAX_CONTROL_FRAME_PAYLOAD + 8


def test_remote_interest_applies_vets_and_bounds() -> None:
    remote = RemoteInterest(max_entries=2)
    no = lambda peer, entry: "not allowed" if entry[0].startswith("secret") else None  # noqa: E731
    applied = remote.apply("b", 1, wire.Interest(wire.InterestOp.RESET, 1, (("a.*", ""), ("secret.x", ""))), no)
    assert applied.added == [("a.*", "")] and applied.refused == [(("secret.x", ""), "not allowed")]
    applied = remote.apply("b", 1, wire.Interest(wire.InterestOp.ADD, 2, (("b", "w"), ("c", ""))), no)
    assert applied.added == [("b", "w")] and "max_interest_per_peer" in applied.refused[0][1]
    assert remote.match("a.x") == {("b", "")} and remote.match("b") == {("b", "w")}
    assert remote.apply("b", 1, wire.Interest(wire.InterestOp.REMOVE, 2, (("a.*", ""),)), no).stale
    remote.apply("b", 1, wire.Interest(wire.InterestOp.REMOVE, 3, (("a.*", ""),)), no)
    assert remote.match("a.x") == set()
    # a new process of the same peer starts from nothing, whatever its seq
    remote.apply("b", 2, wire.Interest(wire.InterestOp.ADD, 1, (("z", ""),)), no)
    assert remote.entries("b") == {("z", "")} and remote.match("b") == set()
    assert remote.apply("b", 2, wire.Interest(wire.InterestOp.RESYNC, 2), no).resync_requested
    remote.drop("b")
    assert remote.match("z") == set() and remote.peers() == []


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.wait(1) == pytest.approx(0.1, abs=0.01)
    assert bucket.take(0.11)


# --- wire -----------------------------------------------------------------------------------------
def test_interest_frame_round_trip_and_exact_bytes() -> None:
    frame = wire.Interest(wire.InterestOp.ADD, 5, (("a.*", "g"),))
    raw = wire.encode_frame(frame)
    assert raw == bytes([0x06, 9, 0, 5, 1, 3]) + b"a.*" + bytes([1]) + b"g"
    decoder = wire.ControlDecoder()
    decoder.hello = wire.Hello(1, 1, 1, 1)
    assert decoder.feed(raw) == [frame]


def test_publication_round_trips() -> None:
    datagram = frames.encode_publish_datagram("orders.eu", "w", b"\x00payload")
    assert datagram[0] == wire.DatagramKind.PUBLISH
    assert frames.decode_publish_datagram(datagram) == ("orders.eu", "w", b"\x00payload")
    assert frames.decode_publish_message(frames.encode_publish_message(2**40, "a", "", b"x")) == (
        2**40, ("a", "", b"x"))
    assert frames.decode_subject_request(frames.encode_subject_request(1500, "svc", b"q")) == (1500, ("svc", "", b"q"))
    with pytest.raises(ValueError):
        frames.encode_publication("x" * 300, "", b"")


hostile = st.binary(max_size=400)


@settings(max_examples=400, deadline=None)
@given(hostile)
def test_pubsub_decoders_raise_only_protocol_error(data: bytes) -> None:
    for decode in (frames.decode_publish_datagram, frames.decode_publish_message, frames.decode_subject_request,
                   lambda d: frames.decode_publish_datagram(bytes([wire.DatagramKind.PUBLISH]) + d)):
        try:
            decode(data)
        except ProtocolError:
            pass
    decoder = wire.ControlDecoder()
    decoder.hello = wire.Hello(1, 1, 1, 1)
    payload = bytes([wire.FrameType.INTEREST]) + wire.encode_varint(len(data)) + data
    try:
        for frame in decoder.feed(payload):
            assert isinstance(frame, wire.Interest)
            assert all(0 < len(p.encode()) <= wire.MAX_SUBJECT_BYTES for p, _ in frame.entries)
    except ProtocolError:
        pass


def test_interest_decoder_refuses_oversized_and_bad_entries() -> None:
    def frame(payload: bytes) -> bytes:
        return bytes([wire.FrameType.INTEREST]) + wire.encode_varint(len(payload)) + payload

    for payload, needle in [
        (bytes([9, 1, 0]), "op"),
        (bytes([0, 1, 50]), "claims"),
        (bytes([0, 1, 1]) + wire.encode_varint(300) + b"x" * 300 + bytes([0]), "pattern of 300"),
        (bytes([0, 1, 1, 1]) + b"\xff" + bytes([0]), "not UTF-8"),
        (bytes([0, 1, 1, 1]) + b"a" + wire.encode_varint(65) + b"g" * 65, "group of 65"),
    ]:
        decoder = wire.ControlDecoder()  # unusable after a ProtocolError: a new one for each
        decoder.hello = wire.Hello(1, 1, 1, 1)
        with pytest.raises(ProtocolError, match=needle):
            decoder.feed(frame(payload))


# --- config ---------------------------------------------------------------------------------------
def _config(tmp_path: Path, pubsub: dict) -> dict:
    return {
        "node": {"name": "alpha", "mesh": "m", "listen": "127.0.0.1:1"},
        "tls": {"ca": "ca.crt", "cert": "n.crt", "key": "n.key"},
        "peers": [{"name": "beta", "address": "127.0.0.1:2"}, {"name": "gamma", "address": "127.0.0.1:3"}],
        "pubsub": pubsub,
    }


def test_pubsub_config_resolves_per_peer_permissions_and_renders_back(tmp_path: Path) -> None:
    data = _config(tmp_path, {"publish": ["metrics.>"], "peers": [
        {"name": "beta", "publish": ["orders.*"], "subscribe": []}]})
    config = parse_config(data, tmp_path, check_files=False)
    assert config.pubsub.permissions("beta") == (("orders.*",), ())
    assert config.pubsub.permissions("gamma") == (("metrics.>",), (">",))
    import tomllib

    again = parse_config(tomllib.loads(render_config(config)), tmp_path, check_files=False)
    assert again.pubsub == config.pubsub


def test_pubsub_config_errors_name_the_key(tmp_path: Path) -> None:
    data = _config(tmp_path, {"subscribe": ["a..b"], "max_interest_per_peer": 0, "peers": [
        {"name": "betta", "publish": "orders"}, {"name": "gamma", "bogus": 1}]})
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path, check_files=False)
    text = "\n".join(caught.value.errors)
    assert "pubsub.subscribe[0]: subject pattern 'a..b' has an empty token" in text
    assert "pubsub.max_interest_per_peer: must be an integer" in text
    assert "pubsub.peers[0].publish: must be an array of subject patterns" in text
    assert "pubsub.peers[1].bogus: unknown key" in text


def test_pubsub_permissions_for_an_unknown_peer_are_an_error(tmp_path: Path) -> None:
    data = _config(tmp_path, {"peers": [{"name": "betaa", "subscribe": []}]})
    with pytest.raises(ConfigError, match=r"pubsub.peers\[0\].name: 'betaa' is not a configured peer, did you mean 'beta'"):
        parse_config(data, tmp_path, check_files=False)
