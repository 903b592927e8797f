"""The forwarder: a thread that moves events from the outbox to the broker, in order.

It publishes the oldest waiting events, at most `max_inflight` at a time, and
deletes each from the outbox only after its PUBACK. While the broker is
unreachable it publishes nothing, so events wait on disk and not in memory.

Order: the events of one connection go out in seq order, and the broker forwards
them in that order. After a reconnect paho first resends the events that had no
PUBACK, so the forwarder sends nothing new until those are acknowledged. A
consumer therefore receives the events in seq order, except for duplicates: an event
whose PUBACK was lost, or that was sent before a kill -9, arrives again. Delivery
is at least once, and consumers drop duplicates by event_id.

An event that the MQTT client rejects before sending it (paho raises ValueError
for a topic with a wildcard, for instance) cannot succeed on a retry. It is moved
to the outbox's dead_letters table, logged once and counted as dropped, and the
forwarder goes on with the next event.

A PUBACK with a failure reason, such as an MQTT 5 broker's 'Not authorized' for a
topic that its ACL denies, keeps the event in the outbox. The forwarder pauses,
logs the refusal, and sends the oldest refused event again after `retry_after_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from agent.mqtt import AckCallback, MqttPublisher
from agent.outbox import Outbox

log = logging.getLogger(__name__)

# Seconds between checks for events older than the outbox's TTL.
EXPIRE_INTERVAL_S = 1.0
# Maximum sleep of the thread when nothing wakes it.
IDLE_WAIT_S = 0.5


@dataclass
class _Inflight:
    seq: int
    event_id: str
    connection: int  # publisher.connection_count when it was published
    topic: str = ""


class Forwarder:
    """Publishes outbox events through `publisher` on a background thread."""

    def __init__(
        self,
        outbox: Outbox,
        publisher: MqttPublisher,
        *,
        max_inflight: int = 64,
        retry_after_s: float = 30.0,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.outbox = outbox
        self.publisher = publisher
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Acknowledgements from paho's thread: (seq, event_id, failure or None).
        self._acks: deque[tuple[int, str, str | None]] = deque()
        self._inflight: dict[int, _Inflight] = {}
        self._last_sent_seq = 0
        self._refused_seqs: set[int] = set()
        self._retry_at: float | None = None
        self._delivered = 0
        self._refused = 0
        # Send rounds in a row that ended in a refusal; only the first is an error.
        # It resets when the event that started the last round is delivered, not on
        # any delivery, because other events can pass while that one stays refused.
        self._refusal_rounds = 0
        self._round_seq: int | None = None
        self._idle = threading.Condition(self._lock)
        self._sending = True
        self._thread = threading.Thread(target=self._run, name="outbox-forwarder", daemon=True)

    # Public API

    def start(self) -> None:
        self._thread.start()
        log.info("forwarder: started for outbox %s with %d events waiting",
                 self.outbox.path, self.outbox.depth)

    def notify(self) -> None:
        """Wake the thread, because an event was stored."""
        self._wake.set()

    @property
    def inflight_count(self) -> int:
        with self._lock:
            return len(self._inflight)

    @property
    def delivered_count(self) -> int:
        """Events acknowledged by the broker and removed from the outbox since start."""
        with self._lock:
            return self._delivered

    @property
    def refused_count(self) -> int:
        """PUBACKs with a failure reason since start."""
        with self._lock:
            return self._refused

    def wait_until_empty(self, timeout_s: float) -> bool:
        """Block until the outbox is empty and nothing is in flight; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self.outbox.depth or self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, IDLE_WAIT_S))
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sending, wait up to `timeout_s` for the PUBACKs in flight, stop the thread.

        Events not acknowledged stay in the outbox for the next start. PUBACKs that
        arrive later are applied by `apply_acks()`.
        """
        deadline = time.monotonic() + timeout_s
        with self._idle:
            self._sending = False
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(min(deadline - time.monotonic(), IDLE_WAIT_S))
        self._stop.set()
        self._wake.set()
        if self._thread.ident is None:
            # Never started: start-up failed before it, and close() must not hide that error.
            return
        self._thread.join(max(deadline - time.monotonic(), 1.0))
        if self._thread.is_alive():
            log.warning("forwarder: thread did not stop within %.3g s", timeout_s)
        self.apply_acks()
        log.info("forwarder: stopped; %d events delivered, %d in outbox %s",
                 self.delivered_count, self.outbox.depth, self.outbox.path)

    def apply_acks(self) -> None:
        """Delete the events whose PUBACK arrived since the thread last did it."""
        self._apply_acks()

    # The thread

    def _run(self) -> None:
        next_expire = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._apply_acks()
                now = time.monotonic()
                if now >= next_expire:
                    self.outbox.expire()
                    next_expire = now + EXPIRE_INTERVAL_S
                self._send()
            except RuntimeError as exc:
                # publish() after the publisher's stop(); the service is shutting down.
                log.info("forwarder: stopping because publishing failed: %s", exc)
                return
            except Exception:
                log.exception("forwarder: unexpected error; retrying in %.3g s", IDLE_WAIT_S)
                self._stop.wait(IDLE_WAIT_S)
            self._wake.wait(IDLE_WAIT_S)

    def _apply_acks(self) -> None:
        with self._lock:
            acks = list(self._acks)
            self._acks.clear()
        if not acks:
            return

        delivered = [seq for seq, _, failure in acks if failure is None]
        self.outbox.remove(delivered)
        with self._lock:
            for seq, event_id, failure in acks:
                inflight = self._inflight.pop(seq, None)
                topic = inflight.topic if inflight is not None else "?"
                if failure is None:
                    self._delivered += 1
                    if seq == self._round_seq:
                        self._refusal_rounds = 0
                        self._round_seq = None
                    continue
                self._refused += 1
                first_of_round = not self._refused_seqs
                self._refused_seqs.add(seq)
                if not first_of_round:
                    log.debug("forwarder: broker rejected event %s (seq %d): %s",
                              event_id, seq, failure)
                    continue
                self._refusal_rounds += 1
                self._round_seq = seq
                self._retry_at = time.monotonic() + self.retry_after_s
                log.log(
                    logging.ERROR if self._refusal_rounds == 1 else logging.DEBUG,
                    "forwarder: broker rejected event %s (seq %d) on topic %s: %s. Check "
                    "the broker's ACL for client %s and this topic; the event stays in the "
                    "outbox and is sent again in %.3g s (refusal %d in a row)",
                    event_id, seq, topic, failure, self.publisher.client_id,
                    self.retry_after_s, self._refusal_rounds,
                )
            self._idle.notify_all()

    def _send(self) -> None:
        if not self.publisher.is_connected():
            return
        connection = self.publisher.connection_count
        with self._lock:
            if not self._sending:
                return
            if self._refused_seqs:
                if self._inflight or time.monotonic() < (self._retry_at or 0.0):
                    return
                # Send everything again from the oldest refused event.
                self._last_sent_seq = min(self._refused_seqs) - 1
                log.info("forwarder: sending again from seq %d after a refusal",
                         self._last_sent_seq + 1)
                self._refused_seqs.clear()
                self._retry_at = None
            if any(item.connection != connection for item in self._inflight.values()):
                # paho resends these first; anything new now could overtake them.
                return
            room = self.max_inflight - len(self._inflight)
            after = self._last_sent_seq
        if room <= 0:
            return

        for entry in self.outbox.pending(after, room):
            with self._lock:
                self._inflight[entry.seq] = _Inflight(entry.seq, entry.event_id, connection,
                                                      entry.topic)
            try:
                info = self.publisher.publish(
                    entry.topic, entry.payload,
                    on_acked=self._ack_handler(entry.seq, entry.event_id),
                )
            except (ValueError, TypeError) as exc:
                self._drop_unpublishable(entry.seq, entry.event_id, entry.topic,
                                         str(exc).rstrip("."))
                continue
            if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:
                self._drop_unpublishable(entry.seq, entry.event_id, entry.topic,
                                         "payload larger than the broker's maximum packet size")
                continue
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                # paho dropped it, so it is neither sent nor queued: try again later.
                with self._lock:
                    self._inflight.pop(entry.seq, None)
                return
            with self._lock:
                self._last_sent_seq = entry.seq
            log.debug("forwarder: published event %s (seq %d, mid %d)",
                      entry.event_id, entry.seq, info.mid)

    def _drop_unpublishable(self, seq: int, event_id: str, topic: str, reason: str) -> None:
        with self._lock:
            self._inflight.pop(seq, None)
            self._last_sent_seq = seq
        self.outbox.dead_letter(seq, reason)
        log.error("forwarder: cannot publish event %s (seq %d) on topic %r: %s; moved it to "
                  "the dead_letters table of outbox %s and going on with the next event",
                  event_id, seq, topic, reason, self.outbox.path)
        with self._idle:
            self._idle.notify_all()

    def _ack_handler(self, seq: int, event_id: str) -> AckCallback:
        def handle(failure: str | None) -> None:
            with self._lock:
                self._acks.append((seq, event_id, failure))
            self._wake.set()

        return handle

