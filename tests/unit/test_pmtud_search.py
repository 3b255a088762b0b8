"""transport/pmtud.py: which probe goes next, when packets grow, when they fall back (RFC 8899)."""

from __future__ import annotations

from quicmesh.transport.pmtud import LADDER, MAX_PROBES, RAISE_TIMER, PathMtu


def started(base: int, cap: int) -> PathMtu:
    mtu = PathMtu(base, cap)
    assert mtu.probe(0.0) is None  # nothing before traffic fills a packet
    mtu.start()
    return mtu


def test_search_climbs_the_ladder_to_the_cap_then_stops() -> None:
    mtu = started(1200, 9000)
    assert mtu.candidates == [1452, 1472, 4096, 8952, 9000]
    for size in mtu.candidates:
        assert mtu.probe(0.0) == size
        assert mtu.probe(0.0) is None  # one probe in flight at a time
        assert mtu.acked(size) and mtu.size == size
    assert mtu.probe(1e9) is None and not mtu.searching


def test_a_size_lost_max_probes_times_ends_the_search_until_the_raise_timer() -> None:
    mtu = started(1200, 16384)
    assert mtu.probe(0.0) == 1452 and mtu.acked(1452)
    assert mtu.probe(0.0) == 1472 and mtu.acked(1472)
    for _ in range(MAX_PROBES):
        assert mtu.probe(1.0) == 4096
        assert not mtu.lost(4096)  # a failed search is no fall back
    assert mtu.size == 1472
    assert mtu.probe(2.0) is None  # schedules the next try
    assert mtu.probe(2.0 + RAISE_TIMER - 1) is None
    assert mtu.probe(2.0 + RAISE_TIMER) == 4096


def test_one_lost_probe_is_retried_and_a_later_ack_grows() -> None:
    mtu = started(1200, 1452)
    assert mtu.probe(0.0) == 1452
    assert not mtu.lost(1452)
    assert mtu.probe(0.0) == 1452 and mtu.acked(1452) and mtu.size == 1452


def test_black_hole_falls_back_to_the_base_and_searches_again_later() -> None:
    mtu = started(1200, 1472)
    for size in (1452, 1472):
        assert mtu.probe(0.0) == size and mtu.acked(size)
    mtu.large_packet_lost()  # a full-size packet was lost: confirm the size
    assert mtu.probe(5.0) == 1472
    assert not mtu.acked(1472) and mtu.size == 1472  # still carried: nothing changes
    mtu.large_packet_lost()
    for attempt in range(MAX_PROBES):
        assert mtu.probe(6.0) == 1472
        assert mtu.lost(1472) == (attempt == MAX_PROBES - 1)
    assert mtu.size == 1200 and mtu.black_holes == 1
    assert mtu.probe(7.0) is None and mtu.probe(7.0 + RAISE_TIMER) == 1452


def test_nothing_to_probe_at_or_under_the_base() -> None:
    assert PathMtu(1200, 1200).candidates == []
    assert PathMtu(1452, 1500).candidates == [1472, 1500]
    mtu = started(1200, 1200)
    mtu.large_packet_lost()  # packets are at the base: no confirmation
    assert mtu.probe(0.0) is None and LADDER[0] > 1200
