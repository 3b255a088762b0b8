"""Daemon plumbing that needs no node: structured log lines and systemd notifications."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from quicmesh.ops import logs
from quicmesh.ops.daemon import notify


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    yield stream
    logging.getLogger().removeHandler(logs._handler)
    logs._handler = None


def test_text_log_lines_carry_fields(log_stream: io.StringIO) -> None:
    logs.setup("info", "text", log_stream)
    log = logging.getLogger("quicmesh.test")
    log.info("peer disconnected", extra=logs.fields(peer="beta", reason="idle timeout", rtt=0.5, gone=None))
    log.debug("not shown")
    [line] = log_stream.getvalue().splitlines()
    assert line.endswith(' INFO quicmesh.test: peer disconnected peer=beta reason="idle timeout" rtt=0.5')


def test_json_log_lines(log_stream: io.StringIO) -> None:
    logs.setup("debug", "json", log_stream)
    logging.getLogger("quicmesh.test").warning("ready %s", "now", extra=logs.fields(node="alpha"))
    entry = json.loads(log_stream.getvalue())
    assert entry["level"] == "warning" and entry["msg"] == "ready now" and entry["node"] == "alpha"
    assert entry["time"].endswith("Z")


def test_setup_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match="log level"):
        logs.setup("loud", "text")
    with pytest.raises(ValueError, match="log format"):
        logs.setup("info", "xml")


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_a_systemd_style_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               abstract: bool) -> None:
    address = f"\0quicmesh-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + address[1:] if abstract else address)
        assert notify("READY=1", "STATUS=alpha: 2/2 peers connected")
        assert systemd.recv(4096) == b"READY=1\nSTATUS=alpha: 2/2 peers connected"


def test_notify_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
