"""`quicmesh pub`, `quicmesh sub` and `quicmesh request --subject` against running `quicmesh run` daemons."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import CLI_TIMEOUT, RunningMesh, quicmesh_env


def wait_for_interest(mesh: RunningMesh, watcher: str, peer: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mesh.status(watcher)["pubsub"]["interest"]["peers"].get(peer, 0) == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{watcher} never learned {count} interest entries of {peer}")


def test_pub_sub_and_request_by_subject(shared_mesh: RunningMesh, cli) -> None:  # noqa: ANN001
    sub = subprocess.Popen(
        [sys.executable, "-m", "quicmesh", "sub", "orders.>", "--json", "--count", "2", "--timeout", "20",
         "--socket", shared_mesh.socket("beta")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quicmesh_env())
    try:
        wait_for_interest(shared_mesh, "alpha", "beta", 1)
        published = cli("pub", "orders.eu.created", "first", "--reliable", "--socket", shared_mesh.socket("alpha"))
        assert published.returncode == 0, published.stderr
        assert "to 1 node (all accepted)" in published.stderr
        from_stdin = cli("pub", "orders.us", "-", "--socket", shared_mesh.socket("gamma"), input="second\n")
        assert from_stdin.returncode == 0, from_stdin.stderr
        out, err = sub.communicate(timeout=CLI_TIMEOUT)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["subject"], line["peer"]) for line in lines] == [("orders.eu.created", "alpha"), ("orders.us", "gamma")]
    assert "subscribed to orders.> on beta" in err
    wait_for_interest(shared_mesh, "alpha", "beta", 0)  # the subscriber left: so did its interest
    status = shared_mesh.status("beta")["pubsub"]
    assert status["counters"]["delivered"] >= 2 and status["subjects"]

    nobody = cli("request", "--subject", "nobody.home", "?", "--socket", shared_mesh.socket("alpha"))
    assert nobody.returncode == 1 and "no subscriber of 'nobody.home'" in nobody.stderr
    both = cli("request", "beta", "x", "--subject", "a.b", "--socket", shared_mesh.socket("alpha"))
    assert both.returncode == 2 and "either a PEER or --subject" in both.stderr
    bad = cli("pub", "orders.*", "x", "--socket", shared_mesh.socket("alpha"))
    assert bad.returncode == 1 and "wildcard" in bad.stderr and "Traceback" not in bad.stderr
    bad_sub = cli("sub", "a..b", "--socket", shared_mesh.socket("alpha"))
    assert bad_sub.returncode == 1 and "empty token" in bad_sub.stderr
