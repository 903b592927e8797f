"""The agent's YAML config: one schema, validated in one place at start.

Each section is a frozen dataclass, and field metadata carries the help text and
the limits. `load_config` checks every key against them. An unknown key, a wrong
type or a value out of range raises ConfigError, which names the key path (for
example `mqtt.port`), the bad value and what is expected. `facenet-agent check-config`
runs the same check, so Ansible's `validate:` can use it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A device id is one MQTT topic level and part of the client id.
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

# A config is a few KiB. The cap keeps a huge or wrong file (a log, an image)
# from being read into memory before any check runs.
MAX_CONFIG_BYTES = 1024 * 1024

# Maximum length of the repr of a bad value in an error message.
_MAX_VALUE_REPR = 100


class ConfigError(ValueError):
    """The config file is invalid; the message names the key, the value and the fix."""


def _short_repr(value: Any) -> str:
    """Return repr(value) cut to _MAX_VALUE_REPR characters, for error messages."""
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        return text[:_MAX_VALUE_REPR] + f"... ({len(text)} characters)"
    return text


def _option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            choices: tuple[str, ...] | None = None, text_only: bool = False) -> Any:
    # text_only: reject YAML numbers instead of turning them into strings, for
    # values such as host names where a number is a typo.
    metadata = {"help": help, "low": low, "high": high, "choices": choices,
                "text_only": text_only}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelsConfig:
    dir: Path = _option(Path("/var/lib/facenet-agent/models"),
                        "folder written by `facenet-agent models build`")
    verify_sha256: bool = _option(True, "check every model file against manifest.json at load")


@dataclass(frozen=True)
class RuntimeConfig:
    name: str = _option("auto", "inference library; auto takes the tuned choice for this "
                                "device, tuning on first start if there is none",
                        choices=("auto", "onnxruntime", "tflite", "tensorflow"))
    precision: str = _option("auto", "embedder precision; auto takes the tuned choice",
                             choices=("auto", "fp32", "fp16", "int8"))
    threads: int = _option(0, "intra-op threads; 0 means the device profile's core count",
                           low=0, high=256)
    providers: list[str] = _option([], "ONNX Runtime execution providers, in order of "
                                       "preference; empty means the device profile's")
    delegates: list[str] = _option([], "TFLite delegates (xnnpack, gpu), in order of "
                                       "preference; empty means the device profile's")
    batch_size: int = _option(0, "faces per embedder batch; 0 takes the tuned choice",
                              low=0, high=1024)
    embedder_threads: int = _option(0, "intra-op threads of the embedder while the run loop's "
                                       "detect workers share the cores with it; 0 means half "
                                       "the threads when two or more detect workers run, else "
                                       "all of them", low=0, high=256)
    cache_dir: Path = _option(Path("/var/lib/facenet-agent/cache"),
                              "folder for tuning results and TensorRT engines")


@dataclass(frozen=True)
class DeviceConfig:
    profile: str = _option("auto", "device profile name, such as jetson-tx2; auto detects "
                                   "the board")
    profiles_dir: Path | None = _option(None, "folder of device profile YAML files; unset "
                                              "means the device_profiles folder of this "
                                              "source tree")


@dataclass(frozen=True)
class TuningConfig:
    # Off by default so that a start never spends minutes unasked; deployments
    # that want the tuned choice set it, or run `facenet-agent tune` once.
    on_start: bool = _option(False, "tune on start when runtime.name is auto and no cached "
                                    "result matches the models, runtimes and device")
    # 3 % leaves about 2 % for timing noise on a shared machine, so the pick stays
    # within 5 % of the true best (benchmarks/runtimes.sh checks exactly that).
    tolerance: float = _option(0.03, "a batch size is the knee when its throughput is within "
                                     "this fraction of the best", low=0.0, high=0.5)
    max_accuracy_drop: float = _option(0.5, "percentage points of verification accuracy a "
                                            "reduced precision may lose against fp32",
                                       low=0.0, high=100.0)
    eval_dataset: Path | None = _option(None, "folder of identities (DIR/<person>/*.jpg) for "
                                              "the accuracy gate; unset uses the accuracy "
                                              "that `models build` stored in the manifest")
    seconds_per_point: float = _option(1.0, "seconds of timed runs per runtime, precision and "
                                            "batch size", low=0.05, high=600.0)


@dataclass(frozen=True)
class SourceConfig:
    uri: str = _option("", "a folder of images, a video file, a camera index such as 0, "
                           "or an rtsp:// URL")
    frame_step: int = _option(1, "process every Nth video frame", low=1, high=10_000)
    max_frames: int = _option(0, "stop after this many frames; 0 means no limit", low=0)


@dataclass(frozen=True)
class DetectionConfig:
    min_face_size: int = _option(20, "smallest face to find, in pixels", low=12, high=4096)
    scale_factor: float = _option(0.709, "image pyramid step", low=0.1, high=0.95)
    thresholds: list[float] = _option([0.6, 0.7, 0.8], "P-Net, R-Net and O-Net score thresholds")
    max_input_side: int = _option(1280, "longer image side is capped at this many pixels "
                                        "before detection", low=64, high=16384)


@dataclass(frozen=True)
class AlignmentConfig:
    margin: float = _option(0.2, "extra border around the bbox, as a fraction of its size, "
                                 "split evenly between both sides", low=0.0, high=1.0)


@dataclass(frozen=True)
class MatchingConfig:
    metric: str = _option("euclidean", "distance between L2-normalised embeddings",
                          choices=("euclidean", "squared_euclidean"))
    threshold: float = _option(1.1, "a face matches when its distance is below this",
                               low=0.0, high=4.0)
    index: str = _option("auto", "exact searches every embedding; approximate uses a faiss "
                                 "product-quantizer index with an exact rerank (needs faiss-cpu); "
                                 "auto uses it from approximate_min_rows embeddings on",
                         choices=("exact", "approximate", "auto"))
    approximate_min_rows: int = _option(100_000, "embeddings from which index: auto builds the "
                                                 "approximate index", low=1)


@dataclass(frozen=True)
class GalleryConfig:
    path: Path = _option(Path("/var/lib/facenet-agent/gallery.db"), "SQLite gallery file")


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = _option(None, "CA certificate that signed the broker's certificate")
    cert_file: Path | None = _option(None, "client certificate, for brokers that require one")
    key_file: Path | None = _option(None, "private key of the client certificate")


@dataclass(frozen=True)
class MqttConfig:
    host: str = _option("localhost", "broker host name or address", text_only=True)
    port: int = _option(1883, "broker TCP port", low=1, high=65535)
    client_id: str = _option("", "MQTT client id; empty means facenet-agent-<device_id>")
    topic_prefix: str = _option("facenet", "first level of every topic")
    keepalive: int = _option(30, "seconds between keep-alive pings", low=5, high=3600)
    username: str = _option("", "broker user name; empty for anonymous")
    password_file: Path | None = _option(None, "file holding the broker password")
    tls: TlsConfig | None = _option(None, "TLS settings; omit for plain TCP")
    max_queued_messages: int = _option(10_000, "messages paho keeps while disconnected",
                                       low=1)
    password_credential: str = _option(
        "", "name of a systemd credential (a file in $CREDENTIALS_DIRECTORY) holding the "
            "broker password; set this or password_file, not both")
    protocol: str = _option("5", "MQTT protocol version; 5 reports rejected publishes in the "
                                 "PUBACK, 3.1.1 does not", choices=("5", "3.1.1"))
    reconnect_min_delay_s: float = _option(1.0, "least wait before a reconnect attempt, in "
                                                "seconds", low=0.01, high=3600.0)
    reconnect_max_delay_s: float = _option(60.0, "most wait before a reconnect attempt; the "
                                                 "wait doubles up to it, with jitter",
                                           low=0.01, high=3600.0)


@dataclass(frozen=True)
class OutboxConfig:
    path: Path = _option(Path("/var/lib/facenet-agent/outbox.db"),
                         "SQLite file that keeps events until the broker acknowledges them")
    max_events: int = _option(100_000, "events the outbox keeps at most", low=1)
    max_bytes: int = _option(64 * 1024 * 1024, "payload bytes the outbox keeps at most",
                             low=1024)
    ttl_s: float = _option(7 * 24 * 3600.0, "seconds an event may wait before it is dropped",
                           low=1.0)
    full_policy: str = _option("drop_oldest", "what to do with a new event when the outbox is "
                                              "full", choices=("drop_oldest", "reject_new"))
    sync: str = _option("full", "SQLite synchronous mode: full syncs every write to disk and "
                                "survives power loss, normal survives only a process crash",
                        choices=("full", "normal"))
    max_inflight: int = _option(64, "events sent to the broker and waiting for their PUBACK",
                                low=1, high=65535)


@dataclass(frozen=True)
class EventsConfig:
    mode: str = _option("auto", "appearance: one event when a tracked face is confirmed "
                                "and one when it leaves; frame: one event per face per "
                                "frame; auto: frame for a folder or a single image, whose "
                                "files are unrelated scenes, appearance for video, cameras "
                                "and streams", choices=("auto", "appearance", "frame"))
    iou_threshold: float = _option(0.3, "least box overlap (IoU) that links a face to a track",
                                   low=0.01, high=1.0)
    confirm_frames: int = _option(3, "frames out of confirm_window that must show the same "
                                     "identity before it is published", low=1, high=1000)
    confirm_window: int = _option(5, "last frames of a track that confirmation looks at",
                                  low=1, high=1000)
    max_missed_frames: int = _option(10, "frames without the face after which it has left",
                                     low=1, high=100_000)


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_interval_s: float = _option(30.0, "seconds between heartbeat messages",
                                          low=0.05, high=86_400.0)
    prometheus_port: int = _option(0, "port of the Prometheus /metrics endpoint; 0 disables "
                                      "it", low=0, high=65535)
    prometheus_host: str = _option("127.0.0.1", "address the Prometheus endpoint binds to",
                                   text_only=True)


@dataclass(frozen=True)
class ServiceConfig:
    frame_queue_size: int = _option(4, "frames waiting between the source and recognition",
                                    low=1, high=10_000)
    drop_frames: str = _option("auto", "when recognition falls behind: always drops the oldest "
                                       "waiting frame, never makes the source wait, auto drops "
                                       "only for cameras and streams",
                               choices=("auto", "always", "never"))
    drain_timeout_s: float = _option(10.0, "seconds a stop waits for the broker to acknowledge "
                                           "the outbox", low=0.0, high=3600.0)
    finish_timeout_s: float = _option(30.0, "seconds the end of a finite source waits for the "
                                            "broker to acknowledge the outbox",
                                      low=0.0, high=86_400.0)
    detect_workers: int = _option(0, "threads that detect and crop faces, each with its own "
                                     "MTCNN sessions; 0 uses one per core, at most 2",
                                  low=0, high=64)
    max_batch_wait_ms: float = _option(50.0, "longest a detected face waits for more faces to "
                                             "fill an embedding batch, in milliseconds",
                                       low=0.0, high=10_000.0)
    max_frames_in_flight: int = _option(0, "frames between detection and the event stage; when "
                                           "full, frames wait in the frame queue; 0 uses twice "
                                           "the embedding batch size, at least 8 and at most 64",
                                        low=0, high=1024)
    stall_timeout_s: float = _option(120.0, "seconds without progress, while frames are in "
                                            "flight, after which the agent stops sending systemd "
                                            "watchdog pings so that systemd restarts it",
                                     low=1.0, high=86_400.0)


@dataclass(frozen=True)
class SyncConfig:
    group: str = _option("", "server gallery group this device follows; empty disables sync")
    public_key: str = _option("", "the server's Ed25519 public key, base64, as written by "
                                  "`facenet-agent server keygen`; manifests signed by any other "
                                  "key are rejected")
    max_message_bytes: int = _option(1024 * 1024, "larger sync messages are rejected unread",
                                     low=1024, high=256 * 1024 * 1024)
    max_snapshot_bytes: int = _option(1024 * 1024 * 1024, "larger snapshots are rejected",
                                      low=1024)
    fetch_timeout_s: float = _option(15.0, "seconds without a new chunk before the agent asks "
                                           "the server to publish again", low=0.1, high=86_400.0)
    resync_interval_s: float = _option(30.0, "least seconds between two resync requests",
                                       low=0.1, high=86_400.0)
    first_sync_wait_s: float = _option(0.0, "seconds the agent waits at start, before reading "
                                            "frames, for its first gallery from the server when "
                                            "it has never synced; 0 starts at once",
                                       low=0.0, high=3600.0)


@dataclass(frozen=True)
class Config:
    device_id: str = _option("", "unique id of this device, used in topics and the client id")
    models: ModelsConfig = _option(None, "model files")
    runtime: RuntimeConfig = _option(None, "inference runtime")
    device: DeviceConfig = _option(None, "device profile")
    tuning: TuningConfig = _option(None, "runtime, precision and batch size selection")
    source: SourceConfig = _option(None, "where frames come from")
    detection: DetectionConfig = _option(None, "MTCNN settings")
    alignment: AlignmentConfig = _option(None, "face crop settings")
    matching: MatchingConfig = _option(None, "identity matching")
    gallery: GalleryConfig = _option(None, "enrolled identities")
    mqtt: MqttConfig = _option(None, "broker connection")
    outbox: OutboxConfig = _option(None, "durable queue of events not yet acknowledged")
    events: EventsConfig = _option(None, "what the agent publishes and when")
    health: HealthConfig = _option(None, "heartbeat and metrics")
    service: ServiceConfig = _option(None, "run loop queues and stop deadlines")
    sync: SyncConfig = _option(None, "gallery sync from the central server")
    log_level: str = _option("INFO", "logging level",
                             choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"facenet-agent-{self.device_id}"


@dataclass(frozen=True)
class StoreConfig:
    backend: str = _option("sqlite", "where the server keeps identities, published versions and "
                                     "sightings", choices=("sqlite", "postgresql"))
    path: Path = _option(Path("/var/lib/facenet-agent/server.db"), "SQLite file (backend sqlite)")
    dsn: str = _option("", "libpq connection string, such as 'host=db dbname=facenet' "
                           "(backend postgresql); put the password in ~/.pgpass, not here")


@dataclass(frozen=True)
class SigningConfig:
    private_key_file: Path = _option(Path("/etc/facenet-agent/server.key"),
                                     "Ed25519 private key written by `facenet-agent server keygen`")


@dataclass(frozen=True)
class PublishConfig:
    groups: list[str] = _option([], "gallery groups that `server run` publishes and serves")
    chunk_bytes: int = _option(128 * 1024, "snapshot and delta chunk size; keep it below the "
                                           "broker's maximum packet size", low=1024,
                               high=256 * 1024 * 1024)
    max_deltas: int = _option(32, "deltas since the last snapshot before a new snapshot is "
                                  "published", low=0, high=10_000)
    max_manifest_bytes: int = _option(128 * 1024, "largest signed manifest message; older "
                                                  "deltas leave the manifest to stay under it. "
                                                  "Keep it below the broker's maximum packet "
                                                  "size", low=4096, high=256 * 1024 * 1024)
    resync_min_interval_s: float = _option(10.0, "least seconds between two republications "
                                                 "of a group's snapshot on device request",
                                           low=0.0, high=86_400.0)
    poll_interval_s: float = _option(5.0, "seconds between checks of the store for changes to "
                                          "publish", low=0.1, high=86_400.0)


@dataclass(frozen=True)
class CollectorConfig:
    enabled: bool = _option(True, "collect identity events into the sightings store")
    share_group: str = _option("facenet-collectors", "MQTT 5 shared subscription group; "
                                                     "collectors with the same name split the "
                                                     "events between them")
    max_event_bytes: int = _option(64 * 1024, "larger events are rejected unread", low=256)
    batch_size: int = _option(500, "events written to the store per transaction", low=1,
                              high=100_000)


@dataclass(frozen=True)
class ServerConfig:
    server_id: str = _option("", "unique id of this server process, part of its client id")
    store: StoreConfig = _option(None, "identity and sightings store")
    signing: SigningConfig = _option(None, "manifest signing key")
    publish: PublishConfig = _option(None, "gallery publication")
    collector: CollectorConfig = _option(None, "sightings collector")
    mqtt: MqttConfig = _option(None, "broker connection")
    models: ModelsConfig = _option(None, "model files, for `server enroll` from photos")
    runtime: RuntimeConfig = _option(None, "inference runtime, for `server enroll`")
    detection: DetectionConfig = _option(None, "MTCNN settings, for `server enroll`")
    alignment: AlignmentConfig = _option(None, "face crop settings, for `server enroll`")
    log_level: str = _option("INFO", "logging level",
                             choices=("DEBUG", "INFO", "WARNING", "ERROR"))


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that rejects aliases and duplicate keys.

    An alias lets a 1 KiB file expand to gigabytes once a value is copied or
    printed (the "billion laughs" pattern), and no setting needs one. A duplicate
    key would silently replace the first value.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in the config; write the "
                "value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {_short_repr(key)}; keep only one", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """Read a YAML config file with `_ConfigLoader`; raise ConfigError on any problem."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes; "
                          "check that the path names the YAML config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not valid UTF-8 (byte {exc.start}); "
                          "save it as UTF-8 text") from exc
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def load_server_config(path: Path) -> ServerConfig:
    """Read and validate the central server's YAML config; raise ConfigError on any problem."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, "
                          f"got {type(raw).__name__}")
    return parse_server_config(raw, source=str(path))


def parse_server_config(raw: dict[str, Any], source: str = "server config") -> ServerConfig:
    """Validate an already parsed server mapping; see `load_server_config`."""
    from agent.gallery_protocol import check_group_name

    config = typing.cast(ServerConfig, _build(ServerConfig, raw, prefix="", source=source))
    if not _DEVICE_ID.fullmatch(config.server_id):
        raise ConfigError(f"{source}: server_id: expected letters, digits, '.', '_' or '-', "
                          f"got {_short_repr(config.server_id)}")
    for index, group in enumerate(config.publish.groups):
        try:
            check_group_name(group)
        except ValueError as exc:
            raise ConfigError(f"{source}: publish.groups[{index}]: {exc}") from exc
    if config.store.backend == "postgresql" and not config.store.dsn:
        raise ConfigError(f"{source}: store.dsn: missing; backend postgresql needs a libpq "
                          "connection string such as 'host=127.0.0.1 dbname=facenet'")
    if "/" in config.collector.share_group or "+" in config.collector.share_group \
            or "#" in config.collector.share_group or not config.collector.share_group:
        raise ConfigError(f"{source}: collector.share_group: expected one topic level without "
                          f"/ + #, got {_short_repr(config.collector.share_group)}")
    return config


def load_config(path: Path) -> Config:
    """Read and validate the YAML config at `path`; raise ConfigError on any problem."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, "
                          f"got {type(raw).__name__}")
    config = parse_config(raw, source=str(path))
    if not config.device_id:
        raise ConfigError(f"{path}: device_id: missing; set a unique id such as 'gate-01'")
    return config


def parse_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate an already parsed mapping; see `load_config`."""
    config = typing.cast(Config, _build(Config, raw, prefix="", source=source))
    _check_cross_field(config, source)
    return config


def _check_cross_field(config: Config, source: str) -> None:
    thresholds = config.detection.thresholds
    if len(thresholds) != 3 or not all(0.0 < t < 1.0 for t in thresholds):
        raise ConfigError(
            f"{source}: detection.thresholds: expected three scores between 0 and 1 "
            f"(P-Net, R-Net, O-Net), got {_short_repr(thresholds)}"
        )
    if config.device_id and not _DEVICE_ID.fullmatch(config.device_id):
        raise ConfigError(
            f"{source}: device_id: expected letters, digits, '.', '_' or '-' (it is a topic "
            f"level and part of the client id), got {_short_repr(config.device_id)}"
        )
    _check_topic_prefix(config.mqtt.topic_prefix, source)
    if not config.mqtt.host.strip():
        raise ConfigError(f"{source}: mqtt.host: missing; set the broker's host name or address")
    if "\0" in config.mqtt.host:
        raise ConfigError(f"{source}: mqtt.host: contains a NUL byte, "
                          f"got {_short_repr(config.mqtt.host)}")
    if config.mqtt.password_file is not None and config.mqtt.password_credential:
        raise ConfigError(
            f"{source}: mqtt.password_credential: set either it or mqtt.password_file, not both"
        )
    if "/" in config.mqtt.password_credential:
        raise ConfigError(
            f"{source}: mqtt.password_credential: expected a credential name without '/', "
            f"got {_short_repr(config.mqtt.password_credential)}"
        )
    if config.mqtt.reconnect_min_delay_s > config.mqtt.reconnect_max_delay_s:
        raise ConfigError(
            f"{source}: mqtt.reconnect_min_delay_s: must be at most mqtt.reconnect_max_delay_s "
            f"({config.mqtt.reconnect_max_delay_s}), got {config.mqtt.reconnect_min_delay_s}"
        )
    if config.events.confirm_frames > config.events.confirm_window:
        raise ConfigError(
            f"{source}: events.confirm_frames: must be at most events.confirm_window "
            f"({config.events.confirm_window}), got {config.events.confirm_frames}"
        )
    tls = config.mqtt.tls
    if tls is not None and (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(
            f"{source}: mqtt.tls: cert_file and key_file must be set together, "
            f"got cert_file={tls.cert_file} and key_file={tls.key_file}"
        )
    _check_sync(config.sync, source)


def _check_topic_prefix(prefix: str, source: str) -> None:
    # Every event, status and will topic starts with the prefix, and MQTT rejects
    # a publish whose topic has a wildcard or a NUL (MQTT 5.0, section 4.7).
    problem = None
    if not prefix:
        problem = "missing"
    elif prefix.startswith("/") or prefix.endswith("/"):
        problem = "must not start or end with '/'"
    elif "//" in prefix:
        problem = "must not contain an empty level ('//')"
    elif any(char in prefix for char in "+#\0"):
        problem = "must not contain the wildcards '+' or '#' or a NUL byte"
    if problem is not None:
        raise ConfigError(f"{source}: mqtt.topic_prefix: {problem}; expected topic levels "
                          f"such as 'facenet' or 'site-3/facenet', got {_short_repr(prefix)}")


def check_config_files(config: Config, source: str = "config") -> None:
    """Check that every file the config names for reading exists and is readable.

    `load_config` does not do this, so that a config can be checked on a machine
    other than the device. `check-config` and `run` call it.
    """
    files: list[tuple[str, Path | None]] = [("mqtt.password_file", config.mqtt.password_file)]
    tls = config.mqtt.tls
    if tls is not None:
        files += [("mqtt.tls.ca_file", tls.ca_file), ("mqtt.tls.cert_file", tls.cert_file),
                  ("mqtt.tls.key_file", tls.key_file)]
    for key, path in files:
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{source}: {key}: cannot read {path}: {exc.strerror}; "
                              "check the path and the file's owner and mode") from exc


def _check_sync(sync: SyncConfig, source: str) -> None:
    from agent.gallery_protocol import check_group_name, decode_public_key

    if not sync.group:
        return
    try:
        check_group_name(sync.group)
    except ValueError as exc:
        raise ConfigError(f"{source}: sync.group: {exc}") from exc
    if not sync.public_key:
        raise ConfigError(f"{source}: sync.public_key: missing; copy the server's public key "
                          "from the server.pub file that `facenet-agent server keygen` wrote")
    try:
        decode_public_key(sync.public_key)
    except ValueError as exc:
        raise ConfigError(f"{source}: sync.public_key: {exc}") from exc


def parse_section(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """Validate a mapping against the frozen dataclass `cls` as config sections are.

    Other YAML files with a fixed schema (device profiles) use this, so that a
    typo there is rejected with the key named as in the config.
    """
    return _build(cls, raw, prefix, source)


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: expected a mapping, "
                          f"got {_short_repr(raw)}")

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: {prefix}{unknown[0]}: unknown key; valid keys here are "
            f"{', '.join(sorted(fields))}"
        )

    values = {}
    for name, spec in fields.items():
        key = prefix + name
        hint = hints[name]
        if name not in raw:
            if dataclasses.is_dataclass(hint):
                values[name] = _build(typing.cast(type, hint), {}, key + ".", source)
            continue
        values[name] = _convert(hint, raw[name], key, spec.metadata, source)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, metadata: Any, source: str) -> Any:
    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: expected {expected}, got {_short_repr(value)}")

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, key, metadata, source)

    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key + ".", source)

    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            fail(f"a list of {item_type.__name__}")
        return [_convert(item_type, item, f"{key}[{i}]", {}, source)
                for i, item in enumerate(value)]

    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value

    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        _check_range(value, key, metadata, source)
        return value

    if hint is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            fail("a finite number")
        _check_range(value, key, metadata, source)
        return float(value)

    if hint is str:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and not metadata.get("text_only"):
            value = str(value)  # lets `uri: 0` name camera 0
        if not isinstance(value, str):
            fail("a string")
        choices = metadata.get("choices")
        if choices and value not in choices:
            fail("one of " + ", ".join(choices))
        return value

    if hint is Path:
        if not isinstance(value, str) or not value:
            fail("a file path")
        if "\0" in value:
            fail("a file path without NUL bytes")
        return Path(value)

    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _check_range(value: float, key: str, metadata: Any, source: str) -> None:
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and value < low:
        raise ConfigError(f"{source}: {key}: must be at least {low}, got {_short_repr(value)}")
    if high is not None and value > high:
        raise ConfigError(f"{source}: {key}: must be at most {high}, got {_short_repr(value)}")
