"""Durable messages: an SQLite outbox/inbox so that nothing accepted is lost when a node crashes or
restarts (docs/DURABLE.md). :mod:`.store` the database, :mod:`.frame` the wire body, :mod:`.feature` the
feature on the seam, :mod:`.cli` the ``quicmesh outbox`` commands and control ops."""
