"""MQTT publisher for identity events, built on paho-mqtt 2.x.

`MqttPublisher` publishes events with QoS 1 and retain=False, and keeps a retained
status message on `<prefix>/<device_id>/status`: `{"state": "online"}` after each
successful connect, and `{"state": "offline"}` on a clean stop. The broker publishes
the same offline message as the last will when the connection drops without an MQTT
DISCONNECT: a crash, a power cut, or a keepalive timeout.

Paho's network thread connects in the background and reconnects with exponential
back-off and random jitter, so a broker that is unreachable at start is logged but
not fatal, and a fleet that lost its broker does not reconnect in lockstep.

Messages published while the broker is unreachable live only in paho's in-memory
queue. It keeps at most `max_queued_messages` events, counting those still waiting
for their PUBACK, and new events are dropped while it is full. Every queued message
is lost when the process exits, so the agent never publishes events straight
through this class: agent/forwarder.py feeds it from the on-disk outbox.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import TlsConfig

log = logging.getLogger(__name__)

ONLINE_PAYLOAD = json.dumps({"state": "online"}).encode()
OFFLINE_PAYLOAD = json.dumps({"state": "offline"}).encode()

# CONNACK reason codes that a retry with the same settings cannot fix. MQTT 3.1.1
# return codes 4 and 5 map to 134 and 135. mosquitto 2.0.11 answers a wrong password
# with 135 (Not authorized) in both protocol versions, not 134.
_PERMANENT_REFUSALS = frozenset({
    134,  # Bad user name or password
    135,  # Not authorized
    138,  # Banned
    140,  # Bad authentication method
})

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}

# Queue slots that events cannot take, kept for one online and one offline status.
_STATUS_SLOTS = 2

# MQTT 5 reason code 141, which paho also reports when the broker sent no CONNACK
# within the keep-alive time.
_KEEPALIVE_TIMEOUT = 141

LOG_PAYLOAD_BYTES = 64

MessageCallback = Callable[[mqtt.MQTTMessage], None]
# Called once with None when the broker acknowledged a message, or with the name
# of the PUBACK's failure reason code, such as 'Not authorized'.
AckCallback = Callable[[str | None], None]
_Method = TypeVar("_Method", bound=Callable[..., Any])


class _Preview:
    """Payload formatted for a log line, cut to LOG_PAYLOAD_BYTES only when logged."""

    def __init__(self, payload: bytes | bytearray) -> None:
        self._payload = payload

    def __str__(self) -> str:
        if len(self._payload) <= LOG_PAYLOAD_BYTES:
            return repr(self._payload)
        return f"{self._payload[:LOG_PAYLOAD_BYTES]!r}... ({len(self._payload)} bytes)"


def _log_exceptions(method: _Method) -> _Method:
    """Log and swallow any exception from a paho callback.

    paho-mqtt 2.2 re-raises callback exceptions unless `suppress_exceptions` is set,
    and that ends its network thread.
    """

    @functools.wraps(method)
    def guarded(self: MqttPublisher, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            log.exception("MQTT client %s: %s raised", self.client_id, method.__name__)
            return None

    return guarded  # type: ignore[return-value]


def _check_topic_filter(topic: str) -> None:
    """Raise ValueError unless `topic` is a valid MQTT topic filter."""
    if not topic or "\0" in topic or len(topic.encode()) > 65535:
        raise ValueError(
            f"invalid topic filter {topic!r}: it must be 1 to 65535 bytes of UTF-8 without NUL"
        )
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"invalid topic filter {topic!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {topic!r}: '+' must be a whole level")


class MqttPublisher:
    """An MQTT 5 or 3.1.1 client that publishes events and keeps a retained online/offline status.

    All methods are thread-safe. Callbacks run in paho's network thread, so a slow
    callback delays every publish and PUBACK.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        status_topic: str,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        tls: TlsConfig | None = None,
        max_queued_messages: int = 10_000,
        reconnect_min_delay_s: float = 1.0,
        reconnect_max_delay_s: float = 60.0,
        protocol: str = "5",
    ) -> None:
        """Configure the client; nothing connects until `start()`.

        `keepalive` is in seconds. MQTT 3.1.1 lets the broker drop a client that was
        silent for 1.5 keepalives and then publish its last will. mosquitto 2.0.11
        checks only every few seconds, so the will can come later. `tls` with every
        file None uses the system CA store.
        `max_queued_messages` caps the events that wait to be sent or to get a PUBACK.
        paho's queue has room for two more, kept for the status messages.
        `protocol` is "5" or "3.1.1". Only MQTT 5 brokers can reject a single publish,
        for example one that their ACL denies. An MQTT 3.1.1 broker acknowledges it
        and drops it.
        Raises ValueError on an empty client id or an invalid value.
        """
        if not client_id:
            raise ValueError("client_id must not be empty; the broker tells devices apart by it")
        if keepalive <= 0:
            raise ValueError(f"keepalive must be positive seconds, got {keepalive}")
        if max_queued_messages < 1:
            raise ValueError(f"max_queued_messages must be at least 1, got {max_queued_messages}")
        if not 0 < reconnect_min_delay_s <= reconnect_max_delay_s:
            raise ValueError(
                "reconnect delays must satisfy 0 < min <= max, got "
                f"min={reconnect_min_delay_s} max={reconnect_max_delay_s}"
            )
        if password is not None and not username:
            raise ValueError("password is set but username is empty; set both or neither")
        if tls is not None and tls.key_file is not None and tls.cert_file is None:
            raise ValueError(f"tls.key_file {tls.key_file} is set without tls.cert_file")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")

        self.host = host
        self.port = port
        self.client_id = client_id
        self.status_topic = status_topic
        self.keepalive = keepalive
        self.max_queued_messages = max_queued_messages
        self.reconnect_min_delay_s = reconnect_min_delay_s
        self.reconnect_max_delay_s = reconnect_max_delay_s
        self.protocol = protocol
        self.uses_tls = tls is not None

        # One condition guards every field below and wakes the wait_* methods.
        self._state = threading.Condition()
        # True from a successful CONNACK on; subscribe() sends at once only then.
        self._connack_received = False
        # True once the birth message and every subscription have been queued, so a
        # caller woken by wait_connected() publishes after those on the wire.
        self._connected = False
        self._started = False
        self._stopping = False
        self._refused_reason: str | None = None
        # CONNACK failure that a retry may fix, kept for the log line in on_disconnect.
        self._transient_refusal: str | None = None
        self._failed_attempts = 0
        self._connection_count = 0
        self._dropped_messages = 0
        self._pending_mids: set[int] = set()
        # PUBACKs that arrived before publish() returned the mid, with their failure
        # reason or None; see _publish_tracked.
        self._early_acked_mids: dict[int, str | None] = {}
        self._ack_callbacks: dict[int, AckCallback] = {}
        # Pending mids of status messages, a subset of _pending_mids.
        self._status_mids: set[int] = set()
        self._birth_mid: int | None = None
        # Extra fields of the retained online status, set with update_status().
        self._status_fields: dict[str, Any] = {}
        self._online_payload = ONLINE_PAYLOAD
        self._birth_payload: bytes | None = None
        self._subscriptions: dict[str, int] = {}
        self._subscribe_topics: dict[int, str] = {}

        # MQTT 5 has no clean_session flag; connect_async sets clean_start instead.
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True if protocol == "3.1.1" else None,
            protocol=PROTOCOLS[protocol],
        )
        # Without the extra slots, a queue full of events would drop the online status
        # at reconnect, and the retained status would read offline while connected.
        self._client.max_queued_messages_set(max_queued_messages + _STATUS_SLOTS)
        # paho annotates the delays as int but sleeps for float seconds too.
        self._client.reconnect_delay_set(
            min_delay=reconnect_min_delay_s,  # type: ignore[arg-type]
            max_delay=reconnect_max_delay_s,  # type: ignore[arg-type]
        )
        self._client.will_set(status_topic, OFFLINE_PAYLOAD, qos=1, retain=True)
        if username:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_unmatched_message

    # Public API

    def start(self) -> None:
        """Start paho's network thread, which connects and keeps reconnecting.

        Returns at once. Use `wait_connected()` to block until the broker accepted.
        """
        with self._state:
            if self._started:
                raise RuntimeError(f"MQTT client {self.client_id} was already started")
            self._started = True
        log.info(
            "MQTT client %s: connecting to %s:%d with MQTT %s%s (keepalive %d s, status "
            "topic %s)",
            self.client_id, self.host, self.port, self.protocol,
            " over TLS" if self.uses_tls else "", self.keepalive, self.status_topic,
        )
        if self.protocol == "5":
            self._client.connect_async(
                self.host, self.port, keepalive=self.keepalive, clean_start=True
            )
        else:
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()

    def publish(
        self, topic: str, payload: bytes, on_acked: AckCallback | None = None
    ) -> mqtt.MQTTMessageInfo:
        """Queue `payload` on `topic` with QoS 1 and retain=False, and return paho's info.

        `info.rc` is MQTT_ERR_SUCCESS when sent, MQTT_ERR_NO_CONN when queued until
        the next connect, and MQTT_ERR_QUEUE_SIZE when dropped because
        `max_queued_messages` messages are already queued. `on_acked` is called once
        when the PUBACK arrives, in paho's network thread or in this one, and never
        for a dropped message. Raises RuntimeError after `stop()`, and ValueError on
        a topic with wildcards.
        """
        with self._state:
            if self._stopping:
                raise RuntimeError(
                    f"MQTT client {self.client_id} is stopped; message on {topic} not published"
                )
            queued_events = len(self._pending_mids) - len(self._status_mids)
        # Concurrent calls can each pass this check, so the events can overshoot the
        # cap by one per thread. paho's own cap, _STATUS_SLOTS higher, still holds.
        if queued_events >= self.max_queued_messages:
            self._log_dropped(topic, payload)
            info = mqtt.MQTTMessageInfo(0)
            info.rc = mqtt.MQTT_ERR_QUEUE_SIZE
            return info
        return self._publish_tracked(
            topic, payload, retain=False, status=False, on_acked=on_acked
        )

    def wait_for_delivery(self, timeout_s: float) -> bool:
        """Block until every message published so far has its PUBACK.

        Returns False when `timeout_s` passes first. Messages dropped because the
        queue was full are not waited for.
        """
        with self._state:
            mids = set(self._pending_mids)
        return self._wait_for_mids(mids, timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until the broker accepted the connection; False after `timeout_s`."""
        with self._state:
            return self._state.wait_for(lambda: self._connected, timeout=timeout_s)

    def is_connected(self) -> bool:
        """Return True while a connection that the broker accepted is up."""
        with self._state:
            return self._connected

    @property
    def refused_reason(self) -> str | None:
        """Name of the CONNACK reason that stopped reconnecting, such as 'Not authorized'.

        None while the client is connected or still retrying.
        """
        with self._state:
            return self._refused_reason

    @property
    def connection_count(self) -> int:
        """Number of connections the broker has accepted since start()."""
        with self._state:
            return self._connection_count

    @property
    def pending_count(self) -> int:
        """Number of messages published but not yet acknowledged with a PUBACK."""
        with self._state:
            return len(self._pending_mids)

    def subscribe(self, topic: str, callback: MessageCallback, qos: int = 1) -> None:
        """Call `callback(message)` in the network thread for each message on `topic`.

        `topic` may contain wildcards. The subscription is sent now if connected, and
        again after every reconnect. Subscribing to the same topic again replaces its
        callback and QoS. An exception from `callback` is logged, and the network
        thread keeps running. Raises ValueError on an invalid topic filter or QoS.
        """
        _check_topic_filter(topic)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        self._client.message_callback_add(topic, self._guard_callback(topic, callback))
        with self._state:
            self._subscriptions[topic] = qos
            connack_received = self._connack_received
        # Otherwise the next on_connect sends it with the others. Both checks run
        # under self._state, so exactly one of them sends it.
        if connack_received:
            self._send_subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        """Undo `subscribe(topic)`: stop calling its callback and stop re-subscribing it."""
        self._client.message_callback_remove(topic)
        with self._state:
            known = self._subscriptions.pop(topic, None) is not None
            connack_received = self._connack_received
        if known and connack_received:
            rc, _mid = self._client.unsubscribe(topic)
            log.debug("MQTT client %s: unsubscribing from %s (%s)",
                      self.client_id, topic, mqtt.error_string(rc))

    def update_status(self, **fields: Any) -> None:
        """Add `fields` to the retained online status, and publish it again when connected.

        The fields must be JSON-serialisable; "state" is reserved.
        """
        if "state" in fields:
            raise ValueError("the status field 'state' is set by the client itself")
        with self._state:
            self._status_fields.update(fields)
            payload = json.dumps({"state": "online", **self._status_fields}).encode()
            self._online_payload = payload
            send = self._connected and not self._stopping
        if send:
            info = self._publish_tracked(self.status_topic, payload, retain=True, status=True)
            with self._state:
                self._birth_mid = info.mid
                self._birth_payload = payload

    def stop(self, timeout_s: float = 5.0) -> None:
        """Wait for PUBACKs, publish the offline status, disconnect and stop the thread.

        Waits at most `timeout_s` in total for PUBACKs of the queued messages and of
        the offline status. Messages still unacknowledged then are lost, and the count
        is logged. Calling stop() again does nothing.

        NOTE: the final loop_stop() has no timeout, so stop() can overrun `timeout_s`.
        While paho waits to reconnect, it checks for the stop between sleeps of at
        most 1 s. A TCP connect in progress can block for paho's connect timeout,
        5 s by default.
        """
        deadline = time.monotonic() + timeout_s
        with self._state:
            if self._stopping:
                return
            self._stopping = True
            refused = self._refused_reason is not None

        if not refused and not self.wait_for_delivery(timeout_s):
            log.warning(
                "MQTT client %s: %d messages still had no PUBACK after %.3g s; the client "
                "drops them",
                self.client_id, self.pending_count, timeout_s,
            )

        if self.is_connected():
            info = self._publish_tracked(
                self.status_topic, OFFLINE_PAYLOAD, retain=True, status=True
            )
            remaining = max(deadline - time.monotonic(), 0.0)
            if not self._wait_for_mids({info.mid}, remaining):
                log.warning(
                    "MQTT client %s: offline status on %s (mid %d) had no PUBACK before the "
                    "deadline; disconnecting anyway",
                    self.client_id, self.status_topic, info.mid,
                )
        elif self._connection_count > 0:
            log.info(
                "MQTT client %s: not connected at stop, so the offline status is left to "
                "the broker's last will",
                self.client_id,
            )
        else:
            log.info("MQTT client %s: stopped without ever connecting to %s:%d",
                     self.client_id, self.host, self.port)

        self._client.disconnect()
        self._client.loop_stop()
        with self._state:
            self._connack_received = False
            self._connected = False
            self._state.notify_all()
        log.info("MQTT client %s: stopped", self.client_id)

    # Publishing and PUBACK tracking

    def _publish_tracked(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool,
        status: bool,
        on_acked: AckCallback | None = None,
    ) -> mqtt.MQTTMessageInfo:
        # No lock is held around client.publish(): paho holds its own message lock
        # while calling on_publish, and on_publish takes self._state, so holding
        # self._state here could deadlock. A PUBACK can therefore arrive before
        # this method records the mid; on_publish parks such mids in
        # _early_acked_mids.
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._log_dropped(topic, payload)
            return info

        early_ack = False
        early_failure: str | None = None
        with self._state:
            if info.mid in self._early_acked_mids:
                early_ack = True
                early_failure = self._early_acked_mids.pop(info.mid)
            else:
                self._pending_mids.add(info.mid)
                if status:
                    self._status_mids.add(info.mid)
                if on_acked is not None:
                    self._ack_callbacks[info.mid] = on_acked
            dropped = 0
            if not status:
                dropped, self._dropped_messages = self._dropped_messages, 0

        if early_ack and on_acked is not None:
            on_acked(early_failure)
        if dropped:
            log.info(
                "MQTT client %s: queue accepts messages again after %d were dropped",
                self.client_id, dropped,
            )
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            log.debug(
                "MQTT client %s: sent mid %d on %s: %s",
                self.client_id, info.mid, topic, _Preview(payload),
            )
        elif info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.debug(
                "MQTT client %s: queued mid %d on %s until the next connect: %s",
                self.client_id, info.mid, topic, _Preview(payload),
            )
        else:
            # paho keeps the message and sends it after the next CONNACK.
            log.debug(
                "MQTT client %s: queued mid %d on %s (%s): %s",
                self.client_id, info.mid, topic, mqtt.error_string(info.rc), _Preview(payload),
            )
        return info

    def _log_dropped(self, topic: str, payload: bytes) -> None:
        with self._state:
            self._dropped_messages += 1
            dropped = self._dropped_messages
        level = logging.WARNING if dropped == 1 else logging.DEBUG
        log.log(
            level,
            "MQTT client %s: queue full (%d messages), dropped message on %s: %s "
            "(%d dropped since the queue was last free)",
            self.client_id, self.max_queued_messages, topic, _Preview(payload), dropped,
        )

    def _wait_for_mids(self, mids: set[int], timeout_s: float) -> bool:
        with self._state:
            return self._state.wait_for(
                lambda: mids.isdisjoint(self._pending_mids), timeout=max(timeout_s, 0.0)
            )

    # Subscriptions

    def _send_subscribe(self, topic: str, qos: int) -> None:
        rc, mid = self._client.subscribe(topic, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            # The connection dropped in between; the next on_connect subscribes again.
            log.debug(
                "MQTT client %s: subscribe to %s not sent (%s)",
                self.client_id, topic, mqtt.error_string(rc),
            )
            return
        with self._state:
            # Keyed by mid, so this contains at most 65535 entries even if a SUBACK
            # arrived before the mid was stored here.
            self._subscribe_topics[mid] = topic
        log.debug("MQTT client %s: subscribing to %s (mid %d)", self.client_id, topic, mid)

    def _guard_callback(self, topic: str, callback: MessageCallback) -> Callable[..., None]:
        def dispatch(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            try:
                callback(message)
            except Exception:
                log.exception(
                    "MQTT client %s: callback for subscription %s raised on message mid %d "
                    "on %s: %s",
                    self.client_id, topic, message.mid, message.topic, _Preview(message.payload),
                )

        return dispatch

    # paho callbacks, called in the network thread

    @_log_exceptions
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._on_connect_refused(client, reason_code)
            return

        with self._state:
            self._connack_received = True
            self._refused_reason = None
            self._connection_count += 1
            failed_attempts, self._failed_attempts = self._failed_attempts, 0
            subscriptions = list(self._subscriptions.items())
        # The next connection loss starts the back-off at the minimum again.
        client.reconnect_delay_set(
            min_delay=self.reconnect_min_delay_s,  # type: ignore[arg-type]
            max_delay=self.reconnect_max_delay_s,  # type: ignore[arg-type]
        )
        log.info(
            "MQTT client %s: connected to %s:%d after %d failed attempts (session present: %s)",
            self.client_id, self.host, self.port, failed_attempts, flags.session_present,
        )

        self._publish_birth()
        # The client connects with clean_session=True, so the broker drops all of its
        # subscriptions whenever a connection ends. Each new connection starts with
        # none, so every registered topic is subscribed again here.
        for topic, qos in subscriptions:
            try:
                self._send_subscribe(topic, qos)
            except Exception:
                # One failed subscription must not keep the others from being sent.
                log.exception("MQTT client %s: subscribe to %s failed", self.client_id, topic)

        with self._state:
            self._connected = True
            self._state.notify_all()

    def _publish_birth(self) -> None:
        with self._state:
            earlier_birth = self._birth_mid if self._birth_mid in self._pending_mids else None
            payload = self._online_payload
            if self._birth_payload != payload:
                earlier_birth = None
        if earlier_birth is not None:
            # paho sends queued messages right after on_connect returns, so the
            # earlier online status goes out now and another one is not needed.
            log.debug(
                "MQTT client %s: online status mid %d from an earlier connection is still "
                "queued; paho resends it",
                self.client_id, earlier_birth,
            )
            return
        info = self._publish_tracked(self.status_topic, payload, retain=True, status=True)
        with self._state:
            self._birth_mid = info.mid
            self._birth_payload = payload

    def _on_connect_refused(self, client: mqtt.Client, reason_code: ReasonCode) -> None:
        if reason_code.value not in _PERMANENT_REFUSALS:
            # paho closes the connection next; on_disconnect logs the attempt.
            with self._state:
                self._transient_refusal = reason_code.getName()
            return

        with self._state:
            self._refused_reason = reason_code.getName()
            self._state.notify_all()
        log.error(
            "MQTT client %s: broker %s:%d rejected the connection: %s. Reconnecting "
            "stopped. Check the username, the password and the broker's ACL, then "
            "restart the agent",
            self.client_id, self.host, self.port, reason_code.getName(),
        )
        # disconnect() moves paho to the disconnecting state, which makes its loop
        # exit instead of scheduling another attempt.
        client.disconnect()

    @_log_exceptions
    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this when the TCP or TLS connection could not be opened. It does
        # not pass on the OSError, but calls this inside its `except OSError` block
        # (paho-mqtt 2.1, Client.loop_forever), so sys.exc_info() still holds it.
        error = sys.exc_info()[1]
        detail = "could not open the TCP or TLS connection"
        if isinstance(error, OSError):
            detail += f": {error.strerror or error}"
        self._log_connect_failure(detail)

    def _log_connect_failure(self, detail: str) -> None:
        with self._state:
            self._failed_attempts += 1
            attempt = self._failed_attempts
        delay = self._next_reconnect_delay(attempt)
        level = logging.WARNING if attempt == 1 else logging.DEBUG
        log.log(
            level,
            "MQTT client %s: connection attempt %d to %s:%d failed: %s; retrying in %.3g s "
            "(back-off from %.3g to %.3g s with jitter)",
            self.client_id, attempt, self.host, self.port, detail, delay,
            self.reconnect_min_delay_s, self.reconnect_max_delay_s,
        )

    def _next_reconnect_delay(self, attempt: int) -> float:
        """Pick the wait before the next attempt and hand it to paho.

        The cap doubles with each failed attempt, from the minimum to the maximum
        delay, and the wait is drawn uniformly between the minimum and that cap.
        paho calls on_connect_fail and on_disconnect before it waits, and
        reconnect_delay_set() restarts its own doubling, so paho's next wait is
        exactly this value.
        """
        cap = min(self.reconnect_max_delay_s,
                  self.reconnect_min_delay_s * 2.0 ** min(attempt - 1, 62))
        delay = random.uniform(self.reconnect_min_delay_s, cap)
        # paho annotates the delays as int but sleeps for float seconds too.
        self._client.reconnect_delay_set(
            min_delay=delay, max_delay=delay  # type: ignore[arg-type]
        )
        return delay

    @_log_exceptions
    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._state:
            was_connected = self._connack_received
            self._connack_received = False
            self._connected = False
            stopping = self._stopping
            pending = len(self._pending_mids)
            refused = self._refused_reason is not None
            transient_refusal, self._transient_refusal = self._transient_refusal, None
            self._state.notify_all()

        if stopping:
            log.info(
                "MQTT client %s: disconnected from %s:%d", self.client_id, self.host, self.port
            )
        elif was_connected:
            log.warning(
                "MQTT client %s: connection to %s:%d lost (%s); %d messages wait for a PUBACK, "
                "reconnecting",
                self.client_id, self.host, self.port, reason_code.getName(), pending,
            )
        elif transient_refusal is not None:
            self._log_connect_failure(f"broker rejected the connection: {transient_refusal}")
        elif not refused and reason_code.value == _KEEPALIVE_TIMEOUT:
            # The broker accepted TCP but sent nothing back: it is hung or overloaded.
            self._log_connect_failure(
                f"the broker sent no CONNACK within the keep-alive time of {self.keepalive} s; "
                "check that the broker is running and not overloaded"
            )
        elif not refused:
            # A broker that expects TLS closes a plain connection without a CONNACK.
            # NOTE: a broker that rejects the CONNECT packet itself closes it the same
            # way, so the hint is a guess.
            hint = "" if self.uses_tls else "; if the port expects TLS, set mqtt.tls"
            self._log_connect_failure(
                f"the broker closed the connection before its CONNACK "
                f"({reason_code.getName()}){hint}"
            )

    @_log_exceptions
    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        failure = reason_code.getName() if reason_code.is_failure else None
        callback = None
        with self._state:
            if mid in self._pending_mids:
                self._pending_mids.discard(mid)
                self._status_mids.discard(mid)
                callback = self._ack_callbacks.pop(mid, None)
            else:
                self._early_acked_mids[mid] = failure
            self._state.notify_all()

        # MQTT 3.1.1 PUBACKs carry no reason code, so paho reports success for them.
        # A message with an on_acked callback has its refusal reported by its owner.
        if failure is not None:
            log.log(
                logging.DEBUG if callback is not None else logging.WARNING,
                "MQTT client %s: broker rejected mid %d: %s", self.client_id, mid, failure,
            )
        else:
            log.debug("MQTT client %s: PUBACK for mid %d", self.client_id, mid)
        if callback is not None:
            callback(failure)

    @_log_exceptions
    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._state:
            topic = self._subscribe_topics.pop(mid, "<unknown topic>")
        for reason_code in reason_codes:
            if reason_code.is_failure:
                log.error(
                    "MQTT client %s: broker rejected the subscription to %s (mid %d): %s; "
                    "check the broker's ACL for this client",
                    self.client_id, topic, mid, reason_code.getName(),
                )
            else:
                log.debug(
                    "MQTT client %s: subscribed to %s (mid %d, granted QoS %d)",
                    self.client_id, topic, mid, reason_code.value,
                )

    @_log_exceptions
    def _on_unmatched_message(
        self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        # Reached only for a message that no subscribe() topic matches.
        log.debug(
            "MQTT client %s: no callback for message mid %d on %s: %s",
            self.client_id, message.mid, message.topic, _Preview(message.payload),
        )
