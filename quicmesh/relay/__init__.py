"""Relaying: when A cannot reach C directly but both reach B, A and C run their own QUIC + mutual-TLS
connection end to end, its packets carried inside B's connections (docs/RELAY.md)."""
