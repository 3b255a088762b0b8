"""Capture every frame a network namespace sees (run inside the bridge's namespace) and look for a needle.

    python capture.py OUT.json NEEDLE_HEX STOP_FILE MAX_SECONDS

An AF_PACKET socket bound to no interface sees each frame on every port it crosses. Until STOP_FILE exists
(at most MAX_SECONDS), it counts IPv4/UDP frames by (source, destination) and records the frames whose bytes
contain NEEDLE, with their UDP destination port; then writes the summary to OUT.json. Prints ``ready`` once
the socket is open, so nothing sent after that is missed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from collections import Counter

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def main(out: str, needle_hex: str, stop_file: str, max_seconds: float) -> None:
    needle = bytes.fromhex(needle_hex)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    sock.settimeout(0.1)
    print("ready", flush=True)
    frames = 0
    udp_by_pair: Counter[str] = Counter()
    udp_bytes_by_pair: Counter[str] = Counter()
    hits: list[dict[str, object]] = []
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            continue
        frames += 1
        if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
            continue
        header_length = (frame[14] & 0x0F) * 4
        if frame[14 + 9] != socket.IPPROTO_UDP:
            continue
        pair = f"{socket.inet_ntoa(frame[26:30])}>{socket.inet_ntoa(frame[30:34])}"
        udp_by_pair[pair] += 1
        udp_bytes_by_pair[pair] += len(frame)
        if needle in frame:
            port = struct.unpack_from("!H", frame, 14 + header_length + 2)[0]
            hits.append({"pair": pair, "port": port})
    with open(out, "w") as file:
        json.dump({"frames": frames, "udp_by_pair": udp_by_pair, "udp_bytes_by_pair": udp_bytes_by_pair,
                   "needle_hits": hits}, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
