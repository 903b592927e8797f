"""`facenet-agent wait-online`: wait until an agent reports online on its status topic.

The agent keeps a retained JSON message with `"state": "online"` or
`"state": "offline"` on `<prefix>/<device_id>/status`. A deployment tool runs
this check on the device after a restart, with the device's own config and
broker credentials, and stops a rollout on a device that never comes online.

The check connects its own client, with a client id of its own, so it never
takes over the agent's MQTT session nor touches its last will. It needs read
access to the status topic, which a broker ACL must grant to the device's user.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import Config, ConfigError
from agent.events import status_topic

log = logging.getLogger(__name__)

CONNECT_KEEPALIVE_S = 30

# CONNACK reason codes that retrying with the same credentials cannot fix.
_PERMANENT_REFUSALS = frozenset({
    134,  # Bad user name or password
    135,  # Not authorized
})


@dataclass(frozen=True)
class StatusResult:
    """The last state seen on the status topic, and why the wait ended."""

    online: bool
    state: str | None  # "online", "offline", another value, or None when nothing arrived
    detail: str  # one line for the operator


def read_password(config: Config, password_file: Path | None) -> str | None:
    """Return the broker password for `config`, or None for anonymous access.

    `password_file` overrides the config. A credential named by
    mqtt.password_credential is read from $CREDENTIALS_DIRECTORY, which systemd
    sets only inside the service, so a check run from a shell needs
    `password_file`. Raises ConfigError when the password cannot be read.
    """
    mqtt_config = config.mqtt
    if password_file is None and mqtt_config.password_file is not None:
        password_file = mqtt_config.password_file
    if password_file is None and mqtt_config.password_credential:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"mqtt.password_credential is {mqtt_config.password_credential!r} but "
                "CREDENTIALS_DIRECTORY is not set outside the service; pass --password-file"
            )
        password_file = Path(directory) / mqtt_config.password_credential
    if password_file is None or not mqtt_config.username:
        return None
    try:
        text = password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the broker password from {password_file}: "
                          f"{exc.strerror}") from exc
    # Strip one trailing newline, which editors and `echo` add.
    return text.removesuffix("\n")


def wait_for_online(config: Config, timeout_s: float, password: str | None) -> StatusResult:
    """Subscribe to the agent's status topic and wait up to `timeout_s` for "online".

    Returns early when the broker rejects the credentials or the subscription.

    NOTE: a retained "online" left by an agent that died without a clean stop
    counts as online until the broker publishes that agent's last will, which
    takes up to 1.5 keepalive intervals or until the restarted agent connects.
    """
    topic = status_topic(config.mqtt.topic_prefix, config.device_id)
    watcher = _StatusWatcher(topic)
    client = _make_client(config, password, watcher)

    log.info("waiting up to %.0f s for %s on %s:%d to report online on %s",
             timeout_s, config.device_id, config.mqtt.host, config.mqtt.port, topic)
    try:
        client.connect_async(config.mqtt.host, config.mqtt.port, keepalive=CONNECT_KEEPALIVE_S)
        client.loop_start()
        arrived = watcher.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()

    if arrived:
        return StatusResult(True, "online", f"{config.device_id} reports online on {topic}")
    return watcher.failure_result(config.device_id, topic, timeout_s)


def _make_client(config: Config, password: str | None, watcher: _StatusWatcher) -> mqtt.Client:
    mqtt_config = config.mqtt
    client_id = f"{config.mqtt_client_id}-check-{uuid.uuid4().hex[:8]}"
    if mqtt_config.protocol == "3.1.1":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=True, protocol=mqtt.MQTTv311)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
    if mqtt_config.username:
        client.username_pw_set(mqtt_config.username, password)
    tls = mqtt_config.tls
    if tls is not None:
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
        )
    client.on_connect = watcher.on_connect
    client.on_subscribe = watcher.on_subscribe
    client.on_message = watcher.on_message
    return client


class _StatusWatcher:
    """paho callbacks that record what the broker sent about the status topic."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._finished = threading.Event()
        self._online = False
        self._lock = threading.Lock()
        self._last_state: str | None = None
        self._problem: str | None = None
        self._connected = False

    def wait(self, timeout_s: float) -> bool:
        """Block until "online" arrives or the broker rejects the check; True on "online"."""
        self._finished.wait(timeout_s)
        with self._lock:
            return self._online

    def failure_result(self, device_id: str, topic: str, timeout_s: float) -> StatusResult:
        with self._lock:
            state, problem, connected = self._last_state, self._problem, self._connected
        if problem is not None:
            return StatusResult(False, state, problem)
        if not connected:
            detail = "could not connect to the broker"
        elif state is None:
            # mosquitto 2.0.11 grants a subscription that its ACL denies and then
            # delivers nothing, which looks the same as an agent that never connected.
            detail = (f"no status message on {topic}. Has the agent ever connected, and "
                      "may this user read that topic under the broker's ACL?")
        else:
            detail = f"{device_id} still reports {state!r} on {topic}"
        return StatusResult(False, state, f"timed out after {timeout_s:.3g} s: {detail}")

    def _fail(self, problem: str) -> None:
        with self._lock:
            self._problem = problem
        log.warning("status check: %s", problem)
        self._finished.set()

    def on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                   reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            if reason_code.value in _PERMANENT_REFUSALS:
                client.disconnect()
                self._fail(f"the broker rejected the connection: {reason_code.getName()}. "
                           "Check the username and password")
            else:
                log.debug("status check: connection rejected (%s), retrying",
                          reason_code.getName())
            return
        with self._lock:
            self._connected = True
        client.subscribe(self.topic, qos=1)

    def on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                     reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        for reason_code in reason_codes:
            if reason_code.is_failure:
                self._fail(f"the broker rejected the subscription to {self.topic}: "
                           f"{reason_code.getName()}. Grant the device's user read access to "
                           "its status topic")

    def on_message(self, client: mqtt.Client, userdata: object,
                   message: mqtt.MQTTMessage) -> None:
        state = _parse_state(message.payload)
        with self._lock:
            self._last_state = state
        log.info("status check: %s reports %r (retained: %s)", message.topic, state,
                 bool(message.retain))
        if state == "online":
            with self._lock:
                self._online = True
            self._finished.set()


def _parse_state(payload: bytes | bytearray) -> str:
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "<not JSON>"
    if not isinstance(document, dict) or not isinstance(document.get("state"), str):
        return "<no state field>"
    return str(document["state"])
