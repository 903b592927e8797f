"""The run loop: frames from the source, faces recognised, events stored and forwarded.

`run_service` is what `facenet-agent run` calls; `run_agent` runs one config
until its source ends or `stop` is set, and tests call it directly.

Stages and the bounded queues between them:

    capture thread --FrameQueue--> stages --> main loop --Outbox (SQLite)--> forwarder --> broker

The capture thread reads the source into a FrameQueue of
`service.frame_queue_size` frames. When recognition falls behind, a camera or
stream source drops its oldest waiting frame (counted in `frames_dropped`), and
a folder or video file waits, so a file is processed whole. The stages
(agent/stages.py) detect, embed and match on their own threads, with at most
`service.max_frames_in_flight` frames between them, and hand the frames back in
order. The main loop turns the faces into events (one per face per frame, or
one per appearance, by `events.mode`) and commits them to the outbox. The
forwarder publishes the outbox in order and deletes each event after its
PUBACK, so a slow or absent broker fills the disk-bounded outbox, not memory.

Lifecycle hook points, for a `Lifecycle` such as agent.notify.Notifier:
- `ready(status)`: once the models are loaded and warmed up, the outbox is open
  and the MQTT client is started. The broker may still be unreachable then. It is
  called again after each reload.
- `watchdog()`: once per main-loop iteration, at least every FRAME_WAIT_S
  seconds plus the time one frame's events take to store. It is withheld while
  frames are in flight and no stage has made progress for
  `service.stall_timeout_s`, so that systemd restarts a hung inference.
- `reloading(status)`: when SIGHUP's new config was valid and the running one
  starts to drain; `ready` follows once the new one runs.
- `stopping(status, timeout_s)`: when the drain before exit starts, with the
  longest time the drain may take.

Signals (installed by `run_service` only): SIGTERM and SIGINT stop taking frames,
publish the outbox until `service.drain_timeout_s` passes, and exit 0. Events still
unacknowledged then stay in the outbox for the next start. SIGHUP reloads the
config file: an invalid file is logged and the running config kept, a valid
one drains the running pipeline and starts a new one, with the source read from
its beginning again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.config import Config, ConfigError, load_config
from agent.delivery import Delivery
from agent.events import (
    EventContext,
    appearance_event,
    appearance_topic,
    heartbeat_topic,
    identity_event,
    identity_topic,
)
from agent.gallery_sync import GallerySync, start_gallery_sync
from agent.health import FaceRate, Heartbeat, RunStats, start_metrics_server
from agent.models.manifest import ManifestError, load_manifest
from agent.pipeline import Pipeline, Recognition, build_pipeline
from agent.sources import Frame, open_source
from agent.stages import END_OF_SOURCE, FrameResult, StagedRecognizer, build_stages
from agent.tracking import AppearanceUpdate, IouTracker, Observation

log = logging.getLogger(__name__)

# Maximum wait of the main loop for a frame, so the watchdog hook and the stop
# and reload checks run even while a camera delivers nothing.
FRAME_WAIT_S = 1.0


class Lifecycle(Protocol):
    """Receiver of the run loop's state changes; agent.notify.Notifier is one."""

    def ready(self, status: str) -> None: ...

    def watchdog(self) -> None: ...

    def reloading(self, status: str) -> None: ...

    def stopping(self, status: str, timeout_s: float) -> None: ...


class NoLifecycle:
    """A Lifecycle that ignores every state change."""

    def ready(self, status: str) -> None:
        pass

    def watchdog(self) -> None:
        pass

    def reloading(self, status: str) -> None:
        pass

    def stopping(self, status: str, timeout_s: float) -> None:
        pass


@dataclass
class Controls:
    """Requests that reach the run loop from signal handlers or other threads."""

    stop: threading.Event
    reload: threading.Event
    config_path: Path | None = None


# Main-loop outcomes.
_END, _STOP, _RELOAD, _FAILED = "end of source", "stop requested", "reload", "source failed"


def run_service(config_path: Path, lifecycle: Lifecycle | None = None) -> int:
    """Run the agent with signal handling and SIGHUP reloads; return the exit status."""
    config = load_config(config_path)
    controls = Controls(threading.Event(), threading.Event(), config_path)
    _install_signal_handlers(controls)
    while True:
        code, next_config = _run_session(config, controls, lifecycle or NoLifecycle())
        if next_config is None:
            return code
        config = next_config


def run_agent(config: Config, stop: threading.Event | None = None,
              lifecycle: Lifecycle | None = None) -> int:
    """Run until the source ends or `stop` is set; return the process exit status.

    Returns 0 when the source ended and the broker acknowledged every event within
    `service.finish_timeout_s`, or after a requested stop; 1 otherwise.
    """
    controls = Controls(stop or threading.Event(), threading.Event())
    code, _ = _run_session(config, controls, lifecycle or NoLifecycle())
    return code


def _run_session(config: Config, controls: Controls,
                 lifecycle: Lifecycle) -> tuple[int, Config | None]:
    session = _Session(config, lifecycle)
    try:
        session.start()
        lifecycle.ready(f"recognising faces from {config.source.uri}")
        outcome, next_config = session.loop(controls)
        code = session.drain(outcome)
    finally:
        session.close()
    return code, next_config


class _Session:
    """One run of one config: the pipeline, the delivery and the threads around them."""

    def __init__(self, config: Config, lifecycle: Lifecycle) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.stats = RunStats()
        self.face_rate = FaceRate(self.stats)
        self.pipeline: Pipeline | None = None
        self.gallery_sync: GallerySync | None = None
        self.delivery: Delivery | None = None
        self.heartbeat: Heartbeat | None = None
        self.stop_metrics: Callable[[], None] | None = None
        self.capture: _Capture | None = None
        self.stages: StagedRecognizer | None = None
        self._stall_reported = False
        self.gallery_version = 0
        prefix, device = config.mqtt.topic_prefix, config.device_id
        self.identity_topic = identity_topic(prefix, device)
        self.appearance_topic = appearance_topic(prefix, device)
        self.tracker = IouTracker(
            iou_threshold=config.events.iou_threshold,
            confirm_frames=config.events.confirm_frames,
            confirm_window=config.events.confirm_window,
            max_missed_frames=config.events.max_missed_frames,
        )
        self.last_capture_time = time.time()
        self.events_mode = resolve_events_mode(config)

    def start(self) -> None:
        config = self.config
        self.pipeline = build_pipeline(config, for_stages=True)
        self.gallery_version = self.pipeline.gallery.version
        self.context = EventContext(
            device_id=config.device_id,
            model_id=self.pipeline.manifest.model_id,
            metric=config.matching.metric,
            threshold=config.matching.threshold,
        )
        self.delivery = Delivery(config)
        self.delivery.start()
        self.gallery_sync = start_gallery_sync(config, self.pipeline.gallery,
                                               self.delivery.publisher, self.pipeline.manifest)
        health = config.health
        self.heartbeat = Heartbeat(
            self.delivery.publisher,
            heartbeat_topic(config.mqtt.topic_prefix, config.device_id),
            health.heartbeat_interval_s,
            self.health_snapshot,
        )
        self.heartbeat.start()
        if health.prometheus_port:
            self.stop_metrics = start_metrics_server(
                health.prometheus_host, health.prometheus_port, self.health_snapshot
            )
        self.capture = _Capture(config, self.stats)
        self.stages = build_stages(self.pipeline, config, self.capture.take)
        self.capture.start()
        self.stages.start()
        log.info("agent %s started on source %r, events mode %s, client id %s",
                 config.device_id, config.source.uri, self.events_mode,
                 config.mqtt_client_id)

    def loop(self, controls: Controls) -> tuple[str, Config | None]:
        assert self.capture is not None and self.stages is not None
        while True:
            self._watchdog()
            if controls.stop.is_set():
                return _STOP, None
            if controls.reload.is_set():
                controls.reload.clear()
                next_config = self._reload(controls.config_path)
                if next_config is not None:
                    return _RELOAD, next_config
            result = self.stages.next_result(FRAME_WAIT_S)
            if result is None:
                continue
            if result.frame is None:
                return (_FAILED if self.capture.failed else _END), None
            self.handle(result)

    def process(self, frame: Frame) -> None:
        """Recognise one frame on this thread and store its events, bypassing the stages."""
        assert self.pipeline is not None
        result = FrameResult(frame)
        if frame.error is not None:
            result.error = frame.error
        else:
            assert frame.image is not None
            try:
                result.recognitions = self.pipeline.recognize(frame.image)
            except Exception as exc:
                log.debug("recognition failed on %s", frame.source, exc_info=True)
                result.error = f"recognition failed: {exc!r}"
        self.handle(result)

    def handle(self, result: FrameResult) -> None:
        """Count one recognised frame and store its events."""
        frame = result.frame
        assert frame is not None and self.pipeline is not None
        self.stats.add(frames=1)
        self.last_capture_time = frame.capture_time
        if result.error is not None:
            # Unreadable inputs and runtime errors on one frame skip that frame only.
            log.warning("skipped input %s: %s", frame.source, result.error)
            self.stats.add(skipped=1)
            return
        recognitions = result.recognitions

        if not recognitions:
            log.info("%s: no face found", frame.source)
        self.stats.add(faces=len(recognitions))
        # The version each face was matched against: a sync may have applied a
        # newer one while the frame was in the stages.
        self.gallery_version = max((r.match.gallery_version for r in recognitions),
                                   default=self.pipeline.gallery.version)
        if self.events_mode == "frame":
            for recognition in recognitions:
                self._submit_frame_event(frame, recognition)
        else:
            observations = [
                Observation(r.face.bbox, r.match.identity_id, r.match.name, r.match.distance,
                            r.face.score)
                for r in recognitions
            ]
            for update in self.tracker.update(observations, frame.capture_time, frame.source):
                self._submit_appearance(update)

    def drain(self, outcome: str) -> int:
        """Stop the input, store the open appearances and wait for the broker's PUBACKs."""
        assert self.delivery is not None and self.capture is not None
        config = self.config
        timeout_s = (config.service.finish_timeout_s if outcome in (_END, _FAILED)
                     else config.service.drain_timeout_s)
        status = f"draining the outbox ({outcome})"
        if outcome == _RELOAD:
            self.lifecycle.reloading(status)
        else:
            self.lifecycle.stopping(status, timeout_s)
        log.info("agent %s: %s; waiting up to %.3g s for the broker", config.device_id,
                 outcome, timeout_s)

        self.capture.stop()
        discarded = self.capture.frames.clear()
        if self.stages is not None:
            discarded += self.stages.close()
        if discarded:
            log.info("agent %s: frames read but not processed at %s: %d", config.device_id,
                     outcome, discarded)
        for update in self.tracker.flush(time.time()):
            self._submit_appearance(update)

        delivered = self.delivery.wait_until_delivered(timeout_s)
        if not delivered:
            log.warning("agent %s: %d events still without PUBACK after %.3g s; they stay "
                        "in outbox %s for the next start", config.device_id,
                        self.delivery.outbox.depth, timeout_s, config.outbox.path)
        if outcome == _FAILED:
            return 1
        if outcome == _END:
            return 0 if delivered else 1
        return 0

    def close(self) -> None:
        """Stop every thread and close every file this session opened; safe after a failure."""
        if self.capture is not None:
            self.capture.stop()
        if self.stages is not None:
            self.stages.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.stop_metrics is not None:
            self.stop_metrics()
        if self.gallery_sync is not None:
            self.gallery_sync.stop()
        if self.delivery is not None:
            self.delivery.close(timeout_s=min(self.config.service.drain_timeout_s, 5.0))
        if self.pipeline is not None:
            self.pipeline.gallery.close()
        stats = self.stats.snapshot()
        log.info("agent %s stopped: %d frames, %d faces, %d events stored, %d frames dropped, "
                 "%d inputs skipped", self.config.device_id, stats["frames"], stats["faces"],
                 stats["events"], stats["frames_dropped"], stats["skipped"])

    def health_snapshot(self) -> dict[str, Any]:
        """Return the heartbeat payload; also the source of the Prometheus metrics."""
        config = self.config
        stats = self.stats.snapshot()
        delivery = self.delivery.snapshot() if self.delivery is not None else {}
        pipeline = self.pipeline
        session = pipeline.embedder.session if pipeline is not None else None
        return {
            "device_id": config.device_id,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "agent_version": __version__,
            "model_id": pipeline.manifest.model_id if pipeline is not None else None,
            "gallery_version": self.gallery_version,
            "runtime": {
                "name": getattr(session, "runtime", config.runtime.name),
                "provider": getattr(session, "provider", None),
                # build_pipeline sets `precision` on every session it loads.
                "precision": getattr(session, "precision", "fp32"),
                "batch_size": pipeline.embedder.batch_size if pipeline is not None else None,
            },
            "events_mode": resolve_events_mode(config),
            "faces_per_second": round(self.face_rate.sample(), 3),
            "queue_depth": delivery.get("outbox_depth", 0),
            "dropped": delivery.get("events_dropped", 0),
            "frames_dropped": stats["frames_dropped"],
            **stats,
            **delivery,
        }

    def _watchdog(self) -> None:
        """Ping the watchdog unless frames are in flight and no stage has moved for too long."""
        assert self.stages is not None
        stalled_s = self.stages.stalled_for()
        if stalled_s < self.config.service.stall_timeout_s:
            self.lifecycle.watchdog()
            self._stall_reported = False
            return
        if not self._stall_reported:
            self._stall_reported = True
            log.error("agent %s: no recognition progress for %.0f s with %d frames in flight; "
                      "withholding watchdog pings so that systemd restarts the agent",
                      self.config.device_id, stalled_s, self.stages.in_flight)

    # Events

    def _submit_frame_event(self, frame: Frame, recognition: Recognition) -> None:
        match = recognition.match
        event = identity_event(
            self.context,
            source=frame.source,
            frame_index=frame.index,
            capture_time=frame.capture_time,
            bbox=recognition.face.bbox,
            detection_score=recognition.face.score,
            identity_id=match.identity_id,
            name=match.name,
            distance=match.distance,
            gallery_version=self.gallery_version,
        )
        if self._submit(self.identity_topic, event):
            log.info("event %s stored: %s is %s (distance %.3f)", event["event_id"],
                     frame.source, match.identity_id or "unknown", match.distance)

    def _submit_appearance(self, update: AppearanceUpdate) -> None:
        event = appearance_event(
            self.context,
            phase=update.phase,
            appearance_id=update.appearance_id,
            source=update.source,
            capture_time=update.capture_time,
            first_seen=update.first_seen,
            last_seen=update.last_seen,
            frames_seen=update.frames_seen,
            bbox=update.bbox,
            detection_score=update.detection_score,
            identity_id=update.identity_id,
            name=update.name,
            best_distance=update.best_distance,
            gallery_version=self.gallery_version,
        )
        if self._submit(self.appearance_topic, event):
            log.info("event %s stored: appearance %s %s as %s after %d frames (best distance "
                     "%.3f)", event["event_id"], update.appearance_id, update.phase,
                     update.identity_id or "unknown", update.frames_seen, update.best_distance)

    def _submit(self, topic: str, event: dict[str, Any]) -> bool:
        assert self.delivery is not None
        if self.delivery.submit(topic, event):
            self.stats.add(events=1)
            return True
        self.stats.add(events_rejected=1)
        return False

    def _reload(self, config_path: Path | None) -> Config | None:
        if config_path is None:
            log.warning("agent %s: reload requested but the config did not come from a file",
                        self.config.device_id)
            return None
        try:
            next_config = load_config(config_path)
            # The running pipeline stops before the new one loads, so a models
            # folder without a valid manifest is rejected here, while the old one
            # still runs. Damaged model files are only found by the load itself.
            load_manifest(next_config.models.dir, verify=False)
        except (ConfigError, ManifestError) as exc:
            log.error("agent %s: reload rejected, keeping the running config: %s",
                      self.config.device_id, exc)
            return None
        if next_config.device_id != self.config.device_id:
            log.warning("agent %s: reload changes device_id to %s", self.config.device_id,
                        next_config.device_id)
        log.info("agent %s: reloading config from %s", self.config.device_id, config_path)
        return next_config


# FrameQueue.get() results besides a Frame.
_NO_FRAME = object()
_END_OF_SOURCE = object()


class FrameQueue:
    """A bounded FIFO of frames; a full put drops the oldest frame or waits."""

    def __init__(self, capacity: int, drop_oldest: bool, stats: RunStats) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self._stats = stats
        self._items: deque[object] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._dropped_since_log = 0

    def put(self, item: object) -> bool:
        """Add an item; return False when the queue was closed instead."""
        with self._changed:
            while len(self._items) >= self.capacity and not self._closed:
                if self.drop_oldest and item is not _END_OF_SOURCE:
                    dropped = self._items.popleft()
                    self._stats.add(frames_dropped=1)
                    self._log_drop(dropped)
                    break
                self._changed.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._changed.notify_all()
            return True

    def get(self, timeout_s: float) -> object:
        """Return the oldest item, or _NO_FRAME when none came within `timeout_s`."""
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._items), timeout_s):
                return _NO_FRAME
            item = self._items.popleft()
            self._changed.notify_all()
            return item

    def close(self) -> None:
        """Wake and refuse every waiting and later put."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def clear(self) -> int:
        """Drop every queued frame; return how many there were."""
        with self._changed:
            count = sum(1 for item in self._items if isinstance(item, Frame))
            self._items.clear()
            self._changed.notify_all()
            return count

    def _log_drop(self, dropped: object) -> None:
        # One warning, then one per 100 drops, so an overloaded camera does not
        # flood the log.
        self._dropped_since_log += 1
        if self._dropped_since_log == 1 or self._dropped_since_log % 100 == 0:
            source = dropped.source if isinstance(dropped, Frame) else "?"
            log.warning("recognition is behind the source: dropped frame %s (%d dropped since "
                        "the last report, %d in all)", source, self._dropped_since_log,
                        self._stats.snapshot()["frames_dropped"])
        if self._dropped_since_log % 100 == 0:
            self._dropped_since_log = 0


class _Capture:
    """The thread that reads the source into a FrameQueue."""

    def __init__(self, config: Config, stats: RunStats) -> None:
        source = config.source
        self.uri = source.uri
        self._frame_step = source.frame_step
        self._max_frames = source.max_frames
        policy = config.service.drop_frames
        live = source.uri.isdigit() or "://" in source.uri
        drop = policy == "always" or (policy == "auto" and live)
        self.frames = FrameQueue(config.service.frame_queue_size, drop, stats)
        self.failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.frames.close()
        self._thread.join(5.0)
        if self._thread.is_alive():
            log.warning("source %s: capture thread still blocked in the source after 5 s",
                        self.uri)

    def _run(self) -> None:
        try:
            for frame in self._frames():
                if self._stop.is_set() or not self.frames.put(frame):
                    return
        except Exception as exc:
            self.failed = True
            log.error("source %s failed: %s", self.uri, exc)
        self.frames.put(_END_OF_SOURCE)

    def take(self, timeout_s: float) -> object:
        """Return the next Frame, END_OF_SOURCE, or None when none came within `timeout_s`."""
        item = self.frames.get(timeout_s)
        if item is _NO_FRAME:
            return None
        if item is _END_OF_SOURCE:
            return END_OF_SOURCE
        return item

    def _frames(self) -> Iterator[Frame]:
        return open_source(self.uri, self._frame_step, self._max_frames, stop=self._stop)


def _install_signal_handlers(controls: Controls) -> None:
    def request_stop(signum: int, frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        controls.stop.set()

    def request_reload(signum: int, frame: object) -> None:
        log.info("received SIGHUP; reloading %s", controls.config_path)
        controls.reload.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)


# Suffixes read as one still image when `source.uri` names a single file.
STILL_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def resolve_events_mode(config: Config) -> str:
    """Return the events mode in effect, resolving `auto` from the source.

    Photos in a folder are unrelated scenes, and tracking a face across them
    would merge different people into one appearance. So they get one event
    per face.
    """
    mode = config.events.mode
    if mode != "auto":
        return mode
    source = Path(config.source.uri)
    if source.is_dir() or source.suffix.lower() in STILL_IMAGE_SUFFIXES:
        return "frame"
    return "appearance"
