"""agent.notify against real AF_UNIX datagram sockets, as systemd would listen on them."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, and that path as NOTIFY_SOCKET names it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield sock, str(path)
    finally:
        sock.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def receive_all(sock: socket.socket) -> list[bytes]:
    """Return every datagram already queued on `sock`."""
    datagrams = []
    sock.setblocking(False)
    try:
        while True:
            datagrams.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return datagrams


def test_ready_reaches_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})

    notifier.ready("models loaded")

    assert notifier.enabled
    assert sock.recv(4096) == b"READY=1\nSTATUS=models loaded"


def test_abstract_socket_name() -> None:
    name = f"facenet-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.status("warming up")
        assert sock.recv(4096) == b"STATUS=warming up"
    finally:
        sock.close()


def test_unset_socket_sends_nothing() -> None:
    notifier = Notifier({})

    assert not notifier.enabled
    assert notifier.send({"READY": "1"}) is False
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping("x", 5.0)
    assert notifier.watchdog_interval_s is None


def test_vsock_socket_name_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})

    assert not notifier.enabled
    assert "neither a path nor an abstract socket name" in caplog.text


def test_missing_socket_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})

    with caplog.at_level(logging.DEBUG, logger="agent.notify"):
        first = notifier.send({"READY": "1"})
        second = notifier.send({"STATUS": "still here"})
        notifier.stopping("stopping", 3.0)

    assert first is False
    assert second is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "READY=1" in warnings[0].getMessage()
    assert "No such file or directory" in warnings[0].getMessage()
    debug_lines = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("3 failures so far" in r.getMessage() for r in debug_lines)


def test_newline_in_status_is_flattened(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})

    notifier.status("line one\nREADY=1")

    assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_stopping_extends_timeout(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})

    notifier.stopping("draining 3 events", 12.5)

    assert sock.recv(4096) == (
        b"STOPPING=1\nEXTEND_TIMEOUT_USEC=27500000\nSTATUS=draining 3 events"
    )


def test_reloading_carries_monotonic_time(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})

    notifier.reloading("reloading config")

    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    assert lines[2] == "STATUS=reloading config"


def test_watchdog_paced_by_interval(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    clock = FakeClock()
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"}, clock=clock)

    notifier.watchdog()
    clock.now += 0.5
    notifier.watchdog()
    clock.now += 0.5
    notifier.watchdog()
    clock.now += 0.9
    notifier.watchdog()

    assert notifier.watchdog_interval_s == 4.0
    assert receive_all(sock) == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_watchdog_off_without_interval(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})

    notifier.watchdog()

    assert receive_all(sock) == []


def test_watchdog_for_other_pid_is_off(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    other_pid = str(os.getpid() + 1)
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": other_pid})

    notifier.watchdog()

    assert notifier.watchdog_interval_s is None
    assert receive_all(sock) == []


def test_watchdog_for_own_pid_is_on(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": str(os.getpid())})

    notifier.watchdog()

    assert sock.recv(4096) == b"WATCHDOG=1"


def test_invalid_watchdog_usec_is_off(listener: tuple[socket.socket, str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    _, name = listener
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "soon"})

    assert notifier.watchdog_interval_s is None
    assert "WATCHDOG_USEC='soon'" in caplog.text


def test_send_after_close_is_ignored(listener: tuple[socket.socket, str]) -> None:
    _, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})

    notifier.close()

    assert notifier.send({"STATUS": "late"}) is False
    assert not notifier.enabled


def test_ready_pings_watchdog_when_on(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    clock = FakeClock()
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"}, clock=clock)

    notifier.ready("loaded")
    clock.now += 0.5
    notifier.watchdog()  # within a quarter interval of the ping in READY, so not sent

    assert receive_all(sock) == [b"READY=1\nSTATUS=loaded\nWATCHDOG=1"]


def test_reloading_pings_watchdog_when_on(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"})

    notifier.reloading("reloading")

    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[-1] == "WATCHDOG=1"
