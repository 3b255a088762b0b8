"""quicmesh.transport.guard without a network: CIDR matching, token buckets (time passed in), caps, Retry tokens."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from quicmesh.config import SecuritySection, parse_config
from quicmesh.transport.guard import MAX_BUCKETS, MAX_CACHED_SOURCES, Guard, GuardSettings, TokenBucket, networks, settings_for


def test_allowlist_matches_cidrs_v4_v6_and_mapped_and_counts_drops() -> None:
    guard = Guard(GuardSettings(allowlist=networks(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])))
    assert guard.allowed("10.1.2.3") and guard.allowed("192.0.2.7") and guard.allowed("2001:db8::5")
    assert guard.allowed("::ffff:10.9.9.9")  # an IPv4 source on a dual-stack socket
    assert not guard.allowed("192.0.2.8")
    assert not guard.allowed("11.0.0.1")
    assert not guard.allowed("2001:db9::1")
    assert not guard.allowed("not-an-address")
    assert not guard.allowed("192.0.2.8")  # cached verdict, still counted
    assert guard.counters["not_allowed"] == 5


def test_no_allowlist_allows_everyone_and_empty_allowlist_nobody() -> None:
    assert Guard(GuardSettings()).allowed("203.0.113.1")
    nobody = Guard(GuardSettings(allowlist=()))
    assert not nobody.allowed("127.0.0.1")


def test_allow_cache_is_bounded() -> None:
    guard = Guard(GuardSettings(allowlist=networks(["10.0.0.0/8"])))
    for i in range(MAX_CACHED_SOURCES * 2 + 5):
        guard.allowed(f"11.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(guard._allow_cache) <= MAX_CACHED_SOURCES


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)  # 0.8 token
    assert bucket.take(100.5)      # 1 token
    assert not bucket.take(100.5)
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert not bucket.take(50.0)  # time going backwards never mints tokens


def test_per_source_and_global_handshake_limits() -> None:
    guard = Guard(GuardSettings(handshake_rate_per_source=1.0, handshake_burst_per_source=2,
                                handshake_rate=1.0, handshake_burst=3), now=0.0)
    assert [guard.admit_initial("10.0.0.1", 0.0, 0) for _ in range(3)] == [True, True, False]
    assert guard.admit_initial("10.0.0.2", 0.0, 0)  # another source has its own budget
    assert not guard.admit_initial("10.0.0.3", 0.0, 0)  # but the node-wide one is spent
    assert guard.counters["rate_source"] == 1 and guard.counters["rate_global"] == 1
    assert guard.admit_initial("10.0.0.1", 1.0, 0)  # refilled
    assert guard.status()["dropped"] == 2


def test_pending_cap() -> None:
    guard = Guard(GuardSettings(max_pending_handshakes=4))
    assert guard.admit_initial("10.0.0.1", 0.0, 3)
    assert not guard.admit_initial("10.0.0.1", 0.0, 4)
    assert guard.counters["pending_full"] == 1


def test_zero_turns_checks_off() -> None:
    guard = Guard(GuardSettings())
    assert not guard.active
    assert all(guard.admit_initial("10.0.0.1", 0.0, 10**6) for _ in range(1000))


def test_source_buckets_are_bounded() -> None:
    guard = Guard(GuardSettings(handshake_rate_per_source=0.001, handshake_burst_per_source=1))
    for i in range(MAX_BUCKETS * 2 + 5):
        guard.admit_initial(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 0.0, 0)
    assert len(guard._buckets) <= MAX_BUCKETS


def _client_initial() -> tuple[bytes, QuicConnection]:
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"]))
    client.connect(("127.0.0.1", 4433), now=0.0)
    (data, _), *_ = client.datagrams_to_send(now=0.0)
    return data, client


def test_retry_token_round_trip_and_rejections() -> None:
    guard = Guard(GuardSettings(retry=True))
    data, client = _client_initial()
    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
    reply, ids = guard.retry_check(header, ("127.0.0.1", 5000), now=10.0)
    assert ids is None and reply is not None
    assert pull_quic_header(Buffer(data=reply), host_cid_length=8).packet_type == QuicPacketType.RETRY
    # The client follows the Retry: its next Initial carries the token to the Retry's source CID.
    client.receive_datagram(reply, ("127.0.0.1", 4433), now=0.01)
    (again, _), *_ = client.datagrams_to_send(now=0.01)
    header2 = pull_quic_header(Buffer(data=again), host_cid_length=8)
    assert header2.token
    assert guard.retry_check(header2, ("127.0.0.1", 5000), now=10.5) == (None, (header.destination_cid,
                                                                                  header2.destination_cid))
    # Another address, or too late: dropped and counted.
    assert guard.retry_check(header2, ("127.0.0.2", 5000), now=10.5) == (None, None)
    assert guard.retry_check(header2, ("127.0.0.1", 5000), now=100.0) == (None, None)
    assert guard.counters["retry_sent"] == 1 and guard.counters["retry_invalid"] == 2


def test_settings_for_resolves_peers_into_the_allowlist() -> None:
    config = parse_config({
        "node": {"name": "alpha", "mesh": "m", "listen": "127.0.0.1:0"},
        "tls": {"ca": "ca", "cert": "c", "key": "k"},
        "peers": [{"name": "beta", "address": "192.0.2.9:4433"}, {"name": "gamma", "address": "localhost:4433"},
                  {"name": "delta", "address": "[2001:db8::9]:1"}],
        "security": {"allowlist": ["10.0.0.0/8"], "allowlist_peers": True},
    }, Path("/"), check_files=False)
    settings = asyncio.run(settings_for(config))
    assert settings.allowlist is not None
    shown = {str(n) for n in settings.allowlist}
    assert {"10.0.0.0/8", "192.0.2.9/32", "2001:db8::9/128"} <= shown
    assert "127.0.0.1/32" in shown or "::1/128" in shown  # localhost resolved
    plain = dataclasses.replace(config, security=SecuritySection())
    assert asyncio.run(settings_for(plain)).allowlist is None


@pytest.mark.parametrize("retry", [False, True])
def test_configure_keeps_counters(retry: bool) -> None:
    guard = Guard(GuardSettings(allowlist=()))
    guard.allowed("1.2.3.4")
    guard.configure(GuardSettings(retry=retry))
    assert guard.allowed("1.2.3.4") and guard.counters["not_allowed"] == 1 and guard.retry is retry
