"""Event delivery as the run loop sees it: store in the outbox, then forward to the broker.

`Delivery` builds the outbox, the MQTT client and the forwarder from the config.
`submit()` returns once the event is committed to the outbox; from then on it
reaches the broker at least once unless the outbox drops it under its size or
age bounds. Broker credentials are read here, once, and never logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, MqttConfig
from agent.events import encode, status_topic
from agent.forwarder import Forwarder
from agent.mqtt import MqttPublisher
from agent.outbox import Outbox

log = logging.getLogger(__name__)


def read_password(mqtt: MqttConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """Return the broker password from `mqtt.password_file` or the systemd credential.

    A credential is the file `$CREDENTIALS_DIRECTORY/<mqtt.password_credential>`,
    which systemd writes for `LoadCredential=`. One trailing newline is stripped.
    Raises ConfigError naming the key when the file cannot be read; the message
    never contains the password.
    """
    if mqtt.password_file is not None:
        path, key = mqtt.password_file, "mqtt.password_file"
    elif mqtt.password_credential:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"mqtt.password_credential: {mqtt.password_credential!r} is set but "
                "$CREDENTIALS_DIRECTORY is not; start the agent from a systemd unit with "
                f"LoadCredential={mqtt.password_credential}:<file>, or use mqtt.password_file"
            )
        path, key = Path(directory) / mqtt.password_credential, "mqtt.password_credential"
    else:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key}: cannot read the password from {path}: {reason}") from exc
    password = text[:-1] if text.endswith("\n") else text
    if not password:
        raise ConfigError(f"{key}: the password file {path} is empty")
    if not mqtt.username:
        raise ConfigError(f"{key}: a password is set but mqtt.username is empty; set both")
    return password


def make_publisher(config: Config) -> MqttPublisher:
    """Build the MQTT client from the config; raise ConfigError on unusable credentials."""
    mqtt = config.mqtt
    return MqttPublisher(
        mqtt.host,
        mqtt.port,
        config.mqtt_client_id,
        status_topic=status_topic(mqtt.topic_prefix, config.device_id),
        keepalive=mqtt.keepalive,
        username=mqtt.username or None,
        password=read_password(mqtt),
        tls=mqtt.tls,
        max_queued_messages=mqtt.max_queued_messages,
        reconnect_min_delay_s=mqtt.reconnect_min_delay_s,
        reconnect_max_delay_s=mqtt.reconnect_max_delay_s,
        protocol=mqtt.protocol,
    )


class Delivery:
    """The outbox, the MQTT client and the forwarder of one agent run."""

    def __init__(self, config: Config) -> None:
        settings = config.outbox
        self.publisher = make_publisher(config)
        self.outbox = Outbox(
            settings.path,
            max_events=settings.max_events,
            max_bytes=settings.max_bytes,
            ttl_s=settings.ttl_s,
            full_policy=settings.full_policy,
            sync=settings.sync,
            device_id=config.device_id,
        )
        self.forwarder = Forwarder(
            self.outbox,
            self.publisher,
            max_inflight=settings.max_inflight,
            retry_after_s=config.mqtt.reconnect_max_delay_s,
        )

    def start(self) -> None:
        """Connect in the background and start forwarding what the outbox contains."""
        self.publisher.start()
        self.forwarder.start()

    def submit(self, topic: str, event: dict[str, Any]) -> bool:
        """Store `event` durably for `topic`; return False when the outbox rejected it."""
        stored = self.outbox.put(str(event["event_id"]), topic, encode(event))
        if stored:
            self.forwarder.notify()
        return stored

    def wait_until_delivered(self, timeout_s: float) -> bool:
        """Block until the broker acknowledged every stored event; False after `timeout_s`."""
        return self.forwarder.wait_until_empty(timeout_s)

    def close(self, timeout_s: float) -> None:
        """Stop forwarding and disconnect, waiting at most about `timeout_s` for PUBACKs.

        Events without a PUBACK stay in the outbox and go out after the next start.
        """
        self.forwarder.stop(timeout_s)
        self.publisher.stop(timeout_s=0.0 if self.outbox.depth else timeout_s)
        self.forwarder.apply_acks()
        depth = self.outbox.depth
        if depth:
            log.warning("outbox %s: %d events not yet acknowledged are kept for the next "
                        "start", self.outbox.path, depth)
        self.outbox.close()

    def snapshot(self) -> dict[str, Any]:
        """Return the delivery numbers for the heartbeat and the metrics."""
        return {
            "outbox_depth": self.outbox.depth,
            "outbox_bytes": self.outbox.size_bytes,
            "events_dropped": self.outbox.dropped,
            "events_dropped_full": self.outbox.dropped_full,
            "events_dropped_expired": self.outbox.dropped_expired,
            "events_dropped_unpublishable": self.outbox.dropped_unpublishable,
            "inflight": self.forwarder.inflight_count,
            "delivered": self.forwarder.delivered_count,
            "refused": self.forwarder.refused_count,
            "mqtt_connected": int(self.publisher.is_connected()),
        }
