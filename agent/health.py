"""Health of a running agent: counters, the MQTT heartbeat and the Prometheus endpoint.

`RunStats` counts what the run loop did. `Heartbeat` publishes a JSON snapshot
on `<prefix>/<device_id>/heartbeat` every `health.heartbeat_interval_s`, QoS 1 and
not retained, and skips a beat while the broker is unreachable: the retained
status topic and its last will say whether the device is online. With
`health.prometheus_port` set, `start_metrics_server` serves the same numbers on
http://<prometheus_host>:<port>/metrics through prometheus-client, which is the
optional extra `metrics`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.mqtt import MqttPublisher

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Counters of one agent run; the run loop writes them, other threads read them."""

    frames: int = 0          # frames taken from the source
    frames_dropped: int = 0  # frames discarded because recognition fell behind
    faces: int = 0
    events: int = 0          # events stored in the outbox
    events_rejected: int = 0  # events the outbox refused under reject_new
    skipped: int = 0         # inputs that could not be decoded or processed
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {
                "frames": self.frames,
                "frames_dropped": self.frames_dropped,
                "faces": self.faces,
                "events": self.events,
                "events_rejected": self.events_rejected,
                "skipped": self.skipped,
                "uptime_s": time.monotonic() - self.started,
            }


class FaceRate:
    """Faces per second over about the last `window_s` seconds, for any number of readers."""

    def __init__(self, stats: RunStats, window_s: float = 60.0) -> None:
        self._stats = stats
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=1024)
        self._lock = threading.Lock()
        self.sample()

    def sample(self) -> float:
        """Record the face count now and return the rate since the oldest sample kept."""
        now = time.monotonic()
        faces = self._stats.snapshot()["faces"]
        with self._lock:
            while len(self._samples) > 1 and now - self._samples[1][0] >= self._window_s:
                self._samples.popleft()
            if not self._samples or now - self._samples[-1][0] >= 0.5:
                self._samples.append((now, faces))
            oldest_time, oldest_faces = self._samples[0]
        elapsed = now - oldest_time
        return (faces - oldest_faces) / elapsed if elapsed > 0 else 0.0


class Heartbeat:
    """Publishes `payload()` on `topic` every `interval_s` on a background thread."""

    def __init__(self, publisher: MqttPublisher, topic: str, interval_s: float,
                 payload: Callable[[], dict[str, Any]]) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.publisher = publisher
        self.topic = topic
        self.interval_s = interval_s
        self._payload = payload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._thread.start()
        log.info("heartbeat: every %.3g s on %s", self.interval_s, self.topic)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.publisher.is_connected():
                log.debug("heartbeat: skipped while the broker is unreachable")
                continue
            try:
                body = json.dumps(self._payload(), separators=(",", ":")).encode()
                self.publisher.publish(self.topic, body)
                self.sent += 1
            except RuntimeError:
                return  # the publisher was stopped; the service is shutting down
            except Exception:
                log.exception("heartbeat: building or publishing the heartbeat failed")


def start_metrics_server(host: str, port: int,
                         snapshot: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """Serve `snapshot()` as Prometheus metrics on host:port; return a function that stops it.

    Raises RuntimeError when prometheus-client is not installed, and ConfigError
    when host:port cannot be bound.
    """
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError as exc:
        raise RuntimeError(
            "health.prometheus_port is set but prometheus-client is not installed; install "
            "it with: pip install 'facenet-edge-agent[metrics]'"
        ) from exc

    class _Collector:
        def collect(self) -> Iterator[Any]:
            values = snapshot()
            labels = {"device_id": str(values["device_id"])}
            for name, help_text, kind in METRICS:
                family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                    f"facenet_agent_{name}", help_text, labels=list(labels)
                )
                family.add_metric(list(labels.values()), float(values[name]))
                yield family

    registry = CollectorRegistry()
    registry.register(_Collector())
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        # socket.gaierror (a host that does not resolve) is an OSError too.
        from agent.config import ConfigError

        raise ConfigError(
            f"health.prometheus_host, health.prometheus_port: cannot serve metrics on "
            f"{host}:{port}: {exc.strerror or exc}; pick a free port and an address of "
            "this machine"
        ) from exc
    log.info("metrics: Prometheus endpoint on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)
        log.info("metrics: Prometheus endpoint on %s:%d stopped", host, port)

    return stop


# Name (without the facenet_agent_ prefix and the counters' _total suffix), help
# text and kind of each metric; the names are keys of the health snapshot.
METRICS = (
    ("frames", "frames taken from the source", "counter"),
    ("frames_dropped", "frames discarded because recognition fell behind", "counter"),
    ("faces", "faces recognised", "counter"),
    ("events", "events stored in the outbox", "counter"),
    ("skipped", "inputs that could not be decoded or processed", "counter"),
    ("faces_per_second", "faces recognised per second since the last heartbeat", "gauge"),
    ("outbox_depth", "events waiting in the outbox for a PUBACK", "gauge"),
    ("outbox_bytes", "payload bytes waiting in the outbox", "gauge"),
    ("events_dropped", "events the outbox dropped, full or expired, over its lifetime",
     "counter"),
    ("inflight", "events sent and waiting for their PUBACK", "gauge"),
    ("mqtt_connected", "1 while the broker connection is up", "gauge"),
)
