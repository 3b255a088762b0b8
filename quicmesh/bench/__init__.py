"""``quicmesh bench`` and ``python -m quicmesh.bench.compare``: measure quicmesh, and bare aioquic beside it.

- :mod:`.runner` starts the processes of one run (a receiver and ``--peers`` senders, each in its own
  process) on loopback, collects what they measured and renders it (text, JSON or CSV);
- :mod:`.worker` is one such process (``python -m quicmesh.bench.worker JOB``): a quicmesh node, or a
  bare-aioquic endpoint with the same settings (:mod:`.bare`);
- :mod:`.cli` is the ``quicmesh bench`` glue; :mod:`.compare` runs quicmesh and bare aioquic for every figure
  of issue 7 in one go and prints the ratios; :mod:`.meshscale` times an N-node full mesh;
- :mod:`.nats`, :mod:`.nats_worker` and :mod:`.nats_compare`: a throwaway nats-server with TLS client
  certificates and nats-py processes, for ``compare --nats`` (pub/sub fan-out and requests beside NATS).

Every loop here is bounded in count and in time.
"""

MODES = ("datagram", "message", "request", "bulk", "pubsub")
IMPLS = ("quicmesh", "bare")
