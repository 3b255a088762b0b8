"""A plain UDP echo server that knows nothing of quicmesh: the "unmodified program" of the forwarding tests.

Usage: python udp_echo.py [PORT]   (prints "listening on PORT" once bound; echoes each datagram to its sender)
"""

import socket
import sys

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
print(f"listening on {sock.getsockname()[1]}", flush=True)
while True:
    data, source = sock.recvfrom(65536)
    sock.sendto(data, source)
