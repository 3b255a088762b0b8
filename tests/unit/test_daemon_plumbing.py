"""Daemon plumbing that needs no node: structured log lines, systemd notifications and watchdog, the file
watch behind reload-on-change."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from quicmesh.ops import logs
from quicmesh.ops.credential_watch import FileWatch
from quicmesh.ops.daemon import notify, watchdog_interval


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


@pytest.mark.parametrize(("environment", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),                       # WatchdogSec=30s: a ping every 15 s
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str],
                           interval: float | None) -> None:
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == interval


def test_file_watch_sees_renames_rewrites_and_removals(tmp_path: Path) -> None:
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    cert.write_bytes(b"one")
    key.write_bytes(b"key")
    watch = FileWatch([cert, key])
    assert watch.changed() == []
    stat = os.stat(cert)
    replacement = tmp_path / "node.crt.new"
    replacement.write_bytes(b"two")  # same size
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and same mtime: only the inode differs
    os.replace(replacement, cert)
    assert watch.changed() == [cert]
    watch.remember(watch.paths)
    assert watch.changed() == []
    key.unlink()
    assert watch.changed() == [key]
    key.write_bytes(b"key")
    watch.remember([key])
    with open(key, "ab") as file:  # written in place
        file.write(b"\n")
    assert watch.changed() == [key] and watch.paths == [key]
