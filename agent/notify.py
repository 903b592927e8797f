"""systemd's service notification protocol, spoken without libsystemd.

A unit with `Type=notify` learns about its service's state from datagrams that
the service sends to the AF_UNIX socket named in `$NOTIFY_SOCKET`. Each datagram
contains newline-separated `KEY=VALUE` assignments such as `READY=1` or
`STATUS=...`. A name that starts with `@` is a socket in Linux's abstract
namespace. Outside systemd the variable is unset and every method does nothing,
so the agent calls the same methods whether or not systemd started it.

`WATCHDOG_USEC`, set by systemd when the unit has `WatchdogSec=`, is the
interval within which the service must send `WATCHDOG=1` or be killed and
restarted. `WATCHDOG_PID`, when set, names the process that the watchdog
watches; any other process must not send the pings.

Sending never raises. The first failure is logged as a warning and later ones
at debug level, because a lost notification must not stop face recognition.
The manual pages sd_notify(3) and sd_watchdog_enabled(3) describe the protocol.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Seconds one send may block when systemd is slow to read its socket.
SEND_TIMEOUT_S = 1.0

# A ping goes out once this fraction of the watchdog interval has passed since
# the previous one. sd_watchdog_enabled(3) suggests half, but a quarter leaves
# more of the interval for one slow main-loop iteration.
WATCHDOG_PING_FRACTION = 0.25

# Seconds added to a drain's timeout in STOPPING=1, for closing the MQTT
# connection, the threads and the files after the drain. An estimate, not
# measured on a board.
CLOSE_MARGIN_S = 15.0


class Notifier:
    """A sender of state changes to the service manager named in `$NOTIFY_SOCKET`.

    Methods can be called from any thread and from signal handlers.
    """

    def __init__(self, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from `environ`.

        `environ` defaults to `os.environ`. `clock` returns monotonic seconds and
        paces the watchdog pings.
        """
        env = os.environ if environ is None else environ
        self._clock = clock
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval_s = _watchdog_interval(env) if self._address else None
        self._last_ping = -math.inf
        self._failures = 0
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.settimeout(SEND_TIMEOUT_S)
            log.debug("sd_notify: sending to %r, watchdog interval %s s",
                      self._address, self._watchdog_interval_s)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens for notifications."""
        return self._socket is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds within which the watchdog expects a ping, or None when it is off."""
        return self._watchdog_interval_s

    def ready(self, status: str) -> None:
        """Send READY=1: startup is complete and the service does its work.

        A watchdog ping goes with it, because a reload ends with ready() after
        loading the models, a stretch without main-loop iterations.
        """
        self.send({"READY": "1", "STATUS": status, **self._forced_ping()})

    def status(self, status: str) -> None:
        """Send a one-line status that `systemctl status` shows."""
        self.send({"STATUS": status})

    def watchdog(self) -> None:
        """Send WATCHDOG=1 when enough of the watchdog interval has passed.

        Call it from every main-loop iteration, never from a timer thread, so
        that a hung loop stops the pings and systemd restarts the service.
        """
        interval = self._watchdog_interval_s
        if interval is None:
            return
        now = self._clock()
        if now - self._last_ping < interval * WATCHDOG_PING_FRACTION:
            return
        self._last_ping = now
        self.send({"WATCHDOG": "1"})

    def reloading(self, status: str) -> None:
        """Send RELOADING=1 before a config reload. Call `ready()` when the reload is done.

        A watchdog ping goes with it, so the drain and the model loading of the
        reload get a whole watchdog interval.

        NOTE: a reload whose drain and model loading together outlast WatchdogSec=
        is taken for a hang; whether systemd watches a unit while it reloads is
        not checked here.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send({"RELOADING": "1", "MONOTONIC_USEC": str(monotonic_usec), "STATUS": status,
                   **self._forced_ping()})

    def stopping(self, status: str, timeout_s: float) -> None:
        """Send STOPPING=1 and ask for time to drain for `timeout_s` seconds and close.

        EXTEND_TIMEOUT_USEC moves systemd's stop deadline to `timeout_s` plus
        CLOSE_MARGIN_S from now, if that is later, so a drain may outlast
        `TimeoutStopSec=`.
        """
        extend_usec = max(int((timeout_s + CLOSE_MARGIN_S) * 1_000_000), 1)
        self.send({"STOPPING": "1", "EXTEND_TIMEOUT_USEC": str(extend_usec), "STATUS": status})

    def _forced_ping(self) -> dict[str, str]:
        """Return WATCHDOG=1 when the watchdog is on, and restart the pacing from now."""
        if self._watchdog_interval_s is None:
            return {}
        self._last_ping = self._clock()
        return {"WATCHDOG": "1"}

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send `fields` as one datagram; return False when it was not sent.

        A newline in a value would start a new assignment, so it becomes a space.
        """
        sock, address = self._socket, self._address
        if sock is None or address is None:
            return False
        lines = [f"{key}={value}".replace("\n", " ") for key, value in fields.items()]
        payload = "\n".join(lines).encode("utf-8")
        try:
            sock.sendto(payload, address)
        except OSError as exc:
            self._log_failure(exc, payload)
            return False
        return True

    def close(self) -> None:
        """Close the socket; later calls send nothing."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _log_failure(self, error: OSError, payload: bytes) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning("sd_notify: sending %r to %r failed: %s. The service manager may show "
                        "a stale state. Further failures are logged at debug level",
                        payload, self._address, error)
        else:
            log.debug("sd_notify: sending %r failed (%d failures so far): %s",
                      payload, self._failures, error)


def _socket_address(name: str) -> str | None:
    """Return the AF_UNIX address for a `$NOTIFY_SOCKET` value, or None to send nothing."""
    if not name:
        return None
    if name.startswith("@"):
        # Linux names abstract sockets by a leading NUL byte; systemd writes it as "@".
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    # NOTE: systemd 246 and later may pass "vsock:CID:PORT" to a service in a VM;
    # that form is not supported here.
    log.warning("sd_notify: NOTIFY_SOCKET=%r is neither a path nor an abstract socket name, "
                "so notifications are disabled", name)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Return the watchdog interval in seconds, or None when this process has none."""
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text and pid_text != str(os.getpid()):
        # The watchdog watches another process, for example the parent that exec'd us.
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("sd_notify: WATCHDOG_USEC=%r is not an integer, so watchdog pings are off",
                    usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000
