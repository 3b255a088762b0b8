"""Path MTU discovery for one QUIC connection: DPLPMTUD (RFC 8899) with PING + PADDING probes, sans-I/O.

QUIC packets start at the base size (``limits.max_datagram_size``, 1200 by default: what every path must
carry, RFC 9000 14). Once the handshake is confirmed and the connection has sent a full-size packet (so
larger ones would help), it probes: one packet of a candidate size
holding a PING and PADDING (RFC 9000 14.4), which is not counted as congestion-controlled bytes in flight
(a lost probe is no sign of congestion, RFC 8899 4.4). Acknowledged: the path carries that size, packets
grow to it and the next candidate is tried. Lost ``MAX_PROBES`` times in a row: the search stops at the
largest size that got through, and tries the next one again after ``RAISE_TIMER``.

Black holes (a path that stops carrying large packets, e.g. a route change onto a tunnel that drops them
without an ICMP): when a packet larger than the base is declared lost, a probe of the current size
confirms the path still carries it; ``MAX_PROBES`` such probes lost in a row and packets go back to the
base size at once (searching again after ``RAISE_TIMER``).

This module decides sizes only; transport/_aioquic.py builds and sends the probes and applies the size.
"""

from __future__ import annotations

#: Candidate UDP payload sizes, smallest first: 1500-byte Ethernet under IPv6 (1500 - 40 - 8) and IPv4
#: (1500 - 20 - 8), then jumbo frames (9000 - 48) and larger (loopback's MTU is 65536).
LADDER = (1452, 1472, 4096, 8952, 16384)
#: The largest packet quicmesh sends or receives unless told otherwise: bigger packets mean fewer of
#: them for the same bytes, and per-packet work is most of QUIC's cost in Python.
DEFAULT_CAP = 16384
#: Probes of one size lost in a row before that size counts as not carried (RFC 8899's MAX_PROBES).
MAX_PROBES = 3
#: Seconds before a size that did not get through is tried again (RFC 8899 suggests 600).
RAISE_TIMER = 600.0


class PathMtu:
    """The packet size a connection uses (``size``), and which probe to send next."""

    def __init__(self, base: int, cap: int) -> None:
        self.base = base
        self.size = base
        self.candidates = sorted({size for size in (*LADDER, cap) if base < size <= cap})
        self.black_holes = 0  # how many times packets fell back to the base size
        self._next = 0  # index of the next candidate to probe
        self._in_flight: int | None = None  # the size of the probe waiting for its ACK or loss
        self._failures = 0  # probes of the current candidate (or confirmations) lost in a row
        self._confirming = False  # a large packet was lost: check the current size still gets through
        self._search_at: float | None = None  # when to probe the next candidate (None: nothing to search)
        self.started = False  # the search waits for traffic that fills packets (see start)
        self._deferred = False  # a search stopped: schedule it RAISE_TIMER from the next probe() call

    def start(self) -> None:
        """Search from now on: the connection sent a full-size packet, so larger ones would help. A
        connection that never fills a packet (an idle mesh, requests) never probes: during a large mesh's
        start, probing every new connection at once slowed convergence on a starved 2-vCPU machine."""
        if not self.started:
            self.started = True
            self._search_at = 0.0

    @property
    def searching(self) -> bool:
        return self._search_at is not None or self._confirming

    def probe(self, now: float) -> int | None:
        """The size of the probe to send now, or None (one is in flight, or nothing to probe yet)."""
        if self._in_flight is not None:
            return None
        if self._confirming:
            self._in_flight = self.size
            return self.size
        if self._deferred:
            self._deferred = False
            self._search_at = now + RAISE_TIMER
        if self._search_at is None or now < self._search_at or self._next >= len(self.candidates):
            return None
        self._in_flight = self.candidates[self._next]
        return self._in_flight

    def acked(self, size: int) -> bool:
        """A probe of ``size`` was acknowledged; True if ``size`` (the packet size to use) grew."""
        self._in_flight = None
        self._failures = 0
        self._confirming = False
        if size <= self.size:
            return False
        self.size = size
        self._next = self.candidates.index(size) + 1
        if self._next >= len(self.candidates):
            self._search_at = None  # the cap: nothing larger to look for
        return True

    def lost(self, size: int) -> bool:
        """A probe of ``size`` was declared lost; True if packets must fall back to the base size."""
        self._in_flight = None
        self._failures += 1
        if self._failures < MAX_PROBES:
            return False  # probe the same size again
        self._failures = 0
        if self._confirming and size == self.size:
            self._confirming = False
            self.size = self.base
            self._next = 0
            self.black_holes += 1
            self._search_at = None
            self._deferred = True
            return True
        self._search_at = None  # this size does not get through: try it again later
        self._deferred = True
        return False

    def large_packet_lost(self) -> None:
        """A packet larger than the base size was declared lost: confirm the path still carries ``size``."""
        if self.size > self.base and not self._confirming:
            self._confirming = True
            self._failures = 0
