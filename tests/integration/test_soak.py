"""A short, bounded soak (issue 8): a stranger floods real QUIC Initials and junk while an authenticated peer
floods streams; alpha and beta keep exchanging acked messages with zero loss; memory stays bounded.

Default [security] settings only (no allowlist): the per-source handshake budget does the work.
"""

from __future__ import annotations

import asyncio
import os
import resource
from pathlib import Path

from meshkit import make_mesh
from quicmesh import Node

from test_flood import _flood
from test_strangers import client_initial, udp_from

INITIALS = 800
MESSAGES = 100


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_soak_strangers_and_stream_flood_while_peers_talk(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta", "gamma"])
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(["beta"], timeout=10)
        port = beta.listen_address[1]
        initials = [client_initial(port)[0] for _ in range(INITIALS)]
        rss_before = _rss_mib()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def stranger() -> None:
            with udp_from("127.0.0.2") as sock:
                for index, data in enumerate(initials):
                    sock.sendto(data, ("127.0.0.1", port))
                    if index % 4 == 0:
                        sock.sendto(os.urandom(64 + index % 1100), ("127.0.0.1", port))
                    if index % 25 == 0:
                        await asyncio.sleep(0.005)

        flood = asyncio.create_task(_flood(beta, Path(configs["gamma"].tls.cert).parent, stop))
        strangers = asyncio.create_task(stranger())
        peak = rss_before
        worst = 0.0
        try:
            for index in range(MESSAGES):
                started = loop.time()
                await asyncio.wait_for(alpha.send("beta", b"s%d" % index), 5)
                async with asyncio.timeout(5):
                    while (item := await beta.recv()).peer != "alpha":
                        pass
                assert item.data == b"s%d" % index  # in order, none lost
                worst = max(worst, loop.time() - started)
                peak = max(peak, _rss_mib())
        finally:
            stop.set()
            await asyncio.wait_for(strangers, 15)
            await asyncio.wait_for(flood, 15)
        counters = beta.guard_status()["counters"]
        ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"soak: rss {rss_before:.0f} -> peak {peak:.0f} MiB (ru_maxrss {ru_peak:.0f}), worst message "
              f"{worst * 1000:.0f} ms, guard {counters}")
        assert counters["rate_source"] > INITIALS // 2  # the stranger's handshakes were mostly refused cheaply
        assert worst < 3.0
        assert peak - rss_before < 300  # MiB: generous, but a leak per packet or per stream would blow it
        assert "alpha" in beta.connected_peers()
