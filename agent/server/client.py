"""The server's MQTT 5 client: retained publishes, PUBACK tracking and re-subscribe on connect.

Both the gallery publisher and the sightings collector use it. Like the agent's
client, paho's network thread connects in the background and reconnects with
back-off, and an exception in a callback is logged and never ends that thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.delivery import read_password

log = logging.getLogger(__name__)

MessageCallback = Callable[[mqtt.MQTTMessage], None]
# QoS 1 messages in flight at once. paho's default of 20 caps a snapshot's
# throughput at 20 chunks per round trip.
MAX_INFLIGHT = 256


class ServerClient:
    """An MQTT 5 client for the server processes; see the module docstring."""

    def __init__(self, settings: MqttConfig, client_id: str, *, clean_start: bool = True,
                 session_expiry_s: int = 0) -> None:
        """`session_expiry_s` > 0 with clean_start=False keeps the broker session, and the
        QoS 1 messages queued for it, across reconnects of this client id."""
        self.settings = settings
        self.client_id = client_id
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._state = threading.Condition()
        self._connected = False
        self._connections = 0
        self._pending: set[int] = set()
        self._early: set[int] = set()
        self._subscriptions: dict[str, tuple[int, MessageCallback]] = {}
        self._connect_hooks: list[Callable[[], None]] = []
        self._stopping = False

        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.reconnect_delay_set(
            min_delay=settings.reconnect_min_delay_s,  # type: ignore[arg-type]
            max_delay=settings.reconnect_max_delay_s,  # type: ignore[arg-type]
        )
        if settings.username:
            self._client.username_pw_set(settings.username, read_password(settings))
        tls = settings.tls
        if tls is not None:
            self._client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Call `hook()` in the network thread after each connect, once subscriptions are sent."""
        self._connect_hooks.append(hook)

    def start(self) -> None:
        properties = None
        if self._session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._session_expiry_s
        log.info("server MQTT client %s: connecting to %s:%d", self.client_id,
                 self.settings.host, self.settings.port)
        self._client.connect_async(self.settings.host, self.settings.port,
                                   keepalive=self.settings.keepalive,
                                   clean_start=self._clean_start, properties=properties)
        self._client.loop_start()

    def stop(self) -> None:
        with self._state:
            self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        log.info("server MQTT client %s: stopped", self.client_id)

    def wait_connected(self, timeout_s: float) -> bool:
        with self._state:
            return self._state.wait_for(lambda: self._connected, timeout=timeout_s)

    @property
    def connections(self) -> int:
        """Number of successful connects so far."""
        with self._state:
            return self._connections

    def subscribe(self, topic: str, callback: MessageCallback, qos: int = 1) -> None:
        """Deliver messages on `topic` to `callback`, now and after every reconnect."""
        with self._state:
            self._subscriptions[topic] = (qos, callback)
            connected = self._connected
        if connected:
            self._client.subscribe(topic, qos=qos)

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> int:
        """Queue a QoS 1 message and return its mid; wait_for_delivery() waits for its PUBACK."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")
        with self._state:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)
        return int(info.mid)

    def wait_for_delivery(self, timeout_s: float) -> bool:
        """Block until every published message has its PUBACK; False after `timeout_s`."""
        with self._state:
            return self._state.wait_for(lambda: not self._pending, timeout=timeout_s)

    @property
    def pending_count(self) -> int:
        with self._state:
            return len(self._pending)

    # paho callbacks, in the network thread

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.error("server MQTT client %s: broker rejected the connection: %s",
                      self.client_id, reason_code.getName())
            return
        with self._state:
            subscriptions = {t: q for t, (q, _) in self._subscriptions.items()}
        for topic, qos in subscriptions.items():
            client.subscribe(topic, qos=qos)
        with self._state:
            self._connected = True
            self._connections += 1
            self._state.notify_all()
        log.info("server MQTT client %s: connected to %s:%d (session present: %s)",
                 self.client_id, self.settings.host, self.settings.port, flags.session_present)
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("server MQTT client %s: connect hook failed", self.client_id)

    def _on_disconnect(self, client: mqtt.Client, userdata: object,
                       flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        with self._state:
            was_connected, self._connected = self._connected, False
            stopping = self._stopping
            self._state.notify_all()
        if was_connected and not stopping:
            log.warning("server MQTT client %s: connection lost (%s); reconnecting",
                        self.client_id, reason_code.getName())

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._state:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)
            self._state.notify_all()
        if reason_code.is_failure:
            log.warning("server MQTT client %s: broker rejected mid %d: %s", self.client_id,
                        mid, reason_code.getName())

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        with self._state:
            subscriptions = list(self._subscriptions.items())
        for topic, (_qos, callback) in subscriptions:
            if mqtt.topic_matches_sub(_filter_of(topic), message.topic):
                try:
                    callback(message)
                except Exception:
                    log.exception("server MQTT client %s: callback for %s failed on mid %d",
                                  self.client_id, message.topic, message.mid)
                return


def _filter_of(topic: str) -> str:
    """The topic filter inside a shared subscription `$share/<group>/<filter>`."""
    if topic.startswith("$share/"):
        return topic.split("/", 2)[2]
    return topic


def describe(payload: Any) -> str:
    return repr(bytes(payload[:64])) + (f"... ({len(payload)} bytes)" if len(payload) > 64 else "")
