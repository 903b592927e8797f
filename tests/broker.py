"""A real Mosquitto broker on 127.0.0.1 for tests, and a real paho subscriber.

`MosquittoBroker` runs the mosquitto binary (Debian package `mosquitto`) with a config
file written into a temporary folder. It keeps its port across `stop()` and `start()`,
so a test can take the broker down and bring it back where the client expects it.
`Subscriber` connects a plain paho client and collects what arrives, for checks
that must not trust the code under test.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 5.0
SHUTDOWN_TIMEOUT_S = 5.0


def find_mosquitto() -> str | None:
    """Return the path of the mosquitto binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    Another process can take the port between this call and the broker's bind. The
    broker then fails to start, and `MosquittoBroker.start` raises with its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ReceivedMessage:
    """A message as the subscriber received it; `retain` is the flag on the delivered copy."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class MosquittoBroker:
    """One mosquitto process listening on 127.0.0.1:`port`.

    `extra_config` lines go right after the `listener` line, so listener options such
    as `cafile` or `password_file` apply to it. With `persistence=True` the broker
    saves sessions and queued messages to `workdir` when it stops and loads them
    when it starts again.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        executable: str,
        port: int | None = None,
        extra_config: Iterable[str] = (),
        persistence: bool = False,
    ) -> None:
        self.host = HOST
        self.port = port or free_port()
        self.workdir = workdir
        self.executable = executable
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self._extra_config = list(extra_config)
        self._persistence = persistence
        self._process: subprocess.Popen[bytes] | None = None
        self._subscribers: list[Subscriber] = []

    def start(self) -> None:
        """Start mosquitto and return once its port accepts TCP connections."""
        if self.is_running():
            raise RuntimeError(f"mosquitto is already running on port {self.port}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text())
        self._process = subprocess.Popen(
            [self.executable, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # Errors that come before the log file is open still go to stderr.
            stderr=(self.workdir / "mosquitto.stderr").open("ab"),
        )
        self._wait_until_listening()

    def stop(self) -> None:
        """Stop mosquitto with SIGTERM, or SIGKILL after SHUTDOWN_TIMEOUT_S; no-op if stopped."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is not None:
            return
        # A paused broker ignores SIGTERM until it runs again.
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SHUTDOWN_TIMEOUT_S)

    def pause(self) -> None:
        """Freeze the broker with SIGSTOP: its port still accepts TCP, but it sends nothing."""
        self._running_process().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause`."""
        self._running_process().send_signal(signal.SIGCONT)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """Return the broker's log so far, or an empty string before it has written any."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def subscriber(
        self,
        topic: str,
        *,
        qos: int = 1,
        client_id: str | None = None,
        clean_session: bool = True,
        timeout_s: float = STARTUP_TIMEOUT_S,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> Subscriber:
        """Connect a new subscriber to `topic` and return once the broker sent its SUBACK.

        `ca_file` turns on TLS with that CA, and `client_cert` is a certificate and
        key pair to present. `close()` disconnects every subscriber made here.
        """
        subscriber = Subscriber(
            self.host,
            self.port,
            topic,
            qos=qos,
            client_id=client_id,
            clean_session=clean_session,
            username=username,
            password=password,
            ca_file=ca_file,
            client_cert=client_cert,
        )
        self._subscribers.append(subscriber)
        subscriber.start(timeout_s)
        return subscriber

    def close(self) -> None:
        """Disconnect every subscriber and stop the broker."""
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()
        self.stop()

    def _config_text(self) -> str:
        lines = [f"listener {self.port} {self.host}", *self._extra_config]
        if not any(line.startswith("allow_anonymous") for line in self._extra_config):
            lines.append("allow_anonymous true")
        lines += [
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %H:%M:%S",
            # mosquitto 2.0 started as root switches to the user `mosquitto`, which cannot
            # write into a temporary folder that root created.
            f"user {getpass.getuser()}",
        ]
        return "\n".join(lines) + "\n"

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        process = self._running_process()
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with status {process.returncode} at start; "
                    f"log:\n{self.log_text()}{self._stderr_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"mosquitto did not accept connections on {self.host}:{self.port} within "
            f"{STARTUP_TIMEOUT_S} s; log:\n{self.log_text()}{self._stderr_text()}"
        )

    def _running_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("mosquitto is not running; call start() first")
        return self._process

    def _stderr_text(self) -> str:
        path = self.workdir / "mosquitto.stderr"
        return path.read_text(errors="replace") if path.exists() else ""


class Subscriber:
    """A paho client, independent of agent.mqtt, that records every message on one topic.

    Its network thread reconnects and subscribes again after a broker restart.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        *,
        qos: int = 1,
        client_id: str | None = None,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.topic = topic
        self._host = host
        self._port = port
        self._qos = qos
        self._messages: list[ReceivedMessage] = []
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-subscriber-{uuid.uuid4().hex[:8]}",
            clean_session=clean_session,
        )
        # paho annotates the delays as int but sleeps for float seconds too.
        self._client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        if username:
            self._client.username_pw_set(username, password)
        if ca_file is not None:
            cert, key = client_cert or (None, None)
            self._client.tls_set(ca_certs=str(ca_file), certfile=cert and str(cert),
                                 keyfile=key and str(key))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout_s: float) -> None:
        self._client.connect(self._host, self._port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise RuntimeError(
                f"subscriber got no successful SUBACK for {self.topic!r} within {timeout_s} s"
            )

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A copy of the messages received so far, in arrival order."""
        with self._condition:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least `count` messages have arrived and return all of them.

        Raises AssertionError, listing what did arrive, when `timeout` seconds pass first.
        """
        with self._condition:
            arrived = self._condition.wait_for(lambda: len(self._messages) >= count, timeout)
            received = list(self._messages)
        if not arrived:
            raise AssertionError(
                f"expected {count} messages on {self.topic!r} within {timeout} s, "
                f"got {len(received)}: {received}"
            )
        return received

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic, qos=self._qos)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if not any(code.is_failure for code in reason_codes):
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received = ReceivedMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
        )
        with self._condition:
            self._messages.append(received)
            self._condition.notify_all()
