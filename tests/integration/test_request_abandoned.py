"""A request the asker gave up on (timeout -> STOP_SENDING) must not make the answering node raise when
the handler's answer comes (aioquic: RuntimeError "Cannot send data after the stream was reset")."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from meshkit import make_mesh

from quicmesh.errors import RequestTimeoutError
from quicmesh.runtime.node import Node


def test_an_answer_to_an_abandoned_request_is_dropped_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    configs = make_mesh(tmp_path, ["alpha", "beta"])

    async def scenario() -> bytes:
        alpha, beta = Node(configs["alpha"]), Node(configs["beta"])

        async def slow(peer: str, data: bytes) -> bytes:
            await asyncio.sleep(0.5)
            return b"late " + data

        beta.set_request_handler(slow)
        await alpha.start()
        await beta.start()
        try:
            await alpha.wait_connected(timeout=10)
            with pytest.raises(RequestTimeoutError):
                await alpha.request("beta", b"one", timeout=0.1)
            await asyncio.sleep(0.8)  # beta answers the abandoned request now
            return await alpha.request("beta", b"two", timeout=5)
        finally:
            await alpha.stop()
            await beta.stop()

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(scenario()) == b"late two"
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == [], [(r.getMessage(), r.exc_info and repr(r.exc_info[1])) for r in failures]
