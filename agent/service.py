"""The main job: read frames from the source, recognise faces, publish one event per face.

`run_agent` is what `facenet-agent run` calls. A frame that cannot be decoded or
processed is logged with its source and skipped; it never stops the run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from agent.config import Config
from agent.events import EventContext, encode, identity_event, identity_topic, status_topic
from agent.mqtt import MqttPublisher
from agent.pipeline import Pipeline, build_pipeline
from agent.sources import Frame, open_source

log = logging.getLogger(__name__)

# Seconds to wait at the end of a finite source for the broker's PUBACKs.
DELIVERY_TIMEOUT_S = 30.0


@dataclass
class RunStats:
    frames: int = 0
    faces: int = 0
    events: int = 0
    skipped: int = 0  # inputs that could not be decoded or processed


def run_agent(config: Config, stop: threading.Event | None = None) -> int:
    """Run until the source ends or `stop` is set; return the process exit status."""
    pipeline = build_pipeline(config)
    publisher = make_publisher(config)
    publisher.start()
    log.info("agent %s started on source %r", config.device_id, config.source.uri)

    try:
        stats = process_source(config, pipeline, publisher, stop or threading.Event())
        delivered = publisher.wait_for_delivery(DELIVERY_TIMEOUT_S)
        if not delivered:
            log.warning("agent %s: %d events still without PUBACK after %.0f s",
                        config.device_id, publisher.pending_count, DELIVERY_TIMEOUT_S)
    finally:
        publisher.stop()
        pipeline.gallery.close()

    log.info("agent %s stopped: %d frames, %d faces, %d events, %d inputs skipped",
             config.device_id, stats.frames, stats.faces, stats.events, stats.skipped)
    return 0 if delivered else 1


def make_publisher(config: Config) -> MqttPublisher:
    mqtt = config.mqtt
    password = None
    if mqtt.password_file is not None:
        # Strip one trailing newline, which editors and `echo` add.
        password = mqtt.password_file.read_text(encoding="utf-8").rstrip("\n")
    return MqttPublisher(
        mqtt.host,
        mqtt.port,
        config.mqtt_client_id,
        status_topic=status_topic(mqtt.topic_prefix, config.device_id),
        keepalive=mqtt.keepalive,
        username=mqtt.username or None,
        password=password,
        tls=mqtt.tls,
        max_queued_messages=mqtt.max_queued_messages,
    )


def process_source(config: Config, pipeline: Pipeline, publisher: MqttPublisher,
                   stop: threading.Event) -> RunStats:
    """Recognise every frame of the configured source and publish its events."""
    stats = RunStats()
    context = EventContext(
        device_id=config.device_id,
        model_id=pipeline.manifest.model_id,
        metric=config.matching.metric,
        threshold=config.matching.threshold,
    )
    topic = identity_topic(config.mqtt.topic_prefix, config.device_id)
    source = config.source

    for frame in open_source(source.uri, source.frame_step, source.max_frames):
        if stop.is_set():
            log.info("agent %s: stop requested; leaving the source", config.device_id)
            break
        stats.frames += 1
        if frame.error is not None:
            log.warning("skipped input %s: %s", frame.source, frame.error)
            stats.skipped += 1
            continue
        _publish_frame(frame, pipeline, publisher, context, topic, stats)
    return stats


def _publish_frame(frame: Frame, pipeline: Pipeline, publisher: MqttPublisher,
                   context: EventContext, topic: str, stats: RunStats) -> None:
    assert frame.image is not None
    try:
        recognitions = pipeline.recognize(frame.image)
    except Exception:
        # Any failure on one frame (a runtime error on an odd shape, say) must not
        # stop the agent; the traceback goes to the log with the frame's source.
        log.exception("recognition failed on %s; skipping it", frame.source)
        stats.skipped += 1
        return

    if not recognitions:
        log.info("%s: no face found", frame.source)
    gallery_version = pipeline.gallery.version
    for recognition in recognitions:
        match = recognition.match
        event = identity_event(
            context,
            source=frame.source,
            frame_index=frame.index,
            capture_time=frame.capture_time,
            bbox=recognition.face.bbox,
            detection_score=recognition.face.score,
            identity_id=match.identity_id,
            name=match.name,
            distance=match.distance,
            gallery_version=gallery_version,
        )
        publisher.publish(topic, encode(event))
        stats.faces += 1
        stats.events += 1
        log.info("event %s: %s is %s (distance %.3f)", event["event_id"], frame.source,
                 match.identity_id or "unknown", match.distance)
