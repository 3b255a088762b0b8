"""NAT traversal: peers tell a node the address they see it at, and a peer connected to two nodes that cannot
dial each other gets both to dial at once, so their NATs let the handshakes through (docs/NAT.md)."""
