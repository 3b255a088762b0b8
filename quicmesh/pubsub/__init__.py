"""Subjects: publish/subscribe, queue groups and requests by subject across the mesh (docs/PUBSUB.md).

A feature on the seam (quicmesh/runtime/features.py): :mod:`.subjects` (syntax, the trie), :mod:`.interest`
(what each peer wants; sans-I/O), :mod:`.frames` (the PUBLISH datagram and the feature message and
request bodies), :mod:`.feature` (the ``PubSub`` feature), :mod:`.ops` and :mod:`.cli` (control socket
and ``quicmesh pub/sub``). Importing this package loads none of them.
"""
