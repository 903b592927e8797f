"""`facenet-agent server ...`: keys, enrolment, import, publication and the server process.

Every command reports an input the operator can fix (a missing folder or key, an
unknown group, an unreachable store or broker) as one line on stderr and exits
with status 2; tracebacks are left for bugs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ConfigError, ServerConfig, load_server_config
from agent.gallery import METRICS
from agent.gallery_protocol import check_group_name

log = logging.getLogger(__name__)

BROKER_WAIT_S = 30.0

Handler = Callable[[argparse.Namespace], int]


class ServerCommandError(RuntimeError):
    """A `server` command failed on an input the operator can fix; the message names the fix."""


def add_server_commands(commands: Any) -> None:
    """Register the `server` sub-commands on the top-level parser's subparsers."""
    server = commands.add_parser("server", help="central side: enrol, publish galleries to "
                                                "device groups, collect sightings")
    sub = server.add_subparsers(dest="server_command", required=True)

    keygen = sub.add_parser("keygen", help="write a new Ed25519 key pair: server.key and "
                                           "server.pub")
    keygen.add_argument("--out", type=Path, required=True, help="folder for the two files")
    keygen.set_defaults(handler=_one_line_errors(_keygen))

    enroll = sub.add_parser("enroll", help="embed DIR/<person>/*.jpg and store the identities")
    enroll.add_argument("folder", type=Path, help="folder with one sub-folder per person")
    _common(enroll)
    enroll.set_defaults(handler=_one_line_errors(_enroll))

    load = sub.add_parser("import", help="store embeddings computed elsewhere, from JSON lines "
                                         '{"id", "name", "embeddings": [[...], ...]}')
    load.add_argument("file", type=Path, help="JSON lines file")
    load.add_argument("--model-id", required=True,
                      help="model that computed the embeddings; must match the group's")
    load.add_argument("--embedding-size", type=int, default=128)
    load.add_argument("--metric", default="euclidean", choices=METRICS)
    _common(load)
    load.set_defaults(handler=_one_line_errors(_import))

    remove = sub.add_parser("remove", help="delete an identity from a group")
    remove.add_argument("identity_id")
    _common(remove)
    remove.set_defaults(handler=_one_line_errors(_remove))

    publish = sub.add_parser("publish", help="publish the group's changes as a new version")
    publish.add_argument("--snapshot", action="store_true",
                         help="also publish a full snapshot at that version")
    _common(publish)
    publish.set_defaults(handler=_one_line_errors(_publish))

    run = sub.add_parser("run", help="publish changes, answer resync requests and collect "
                                     "sightings until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="server YAML config")
    run.add_argument("--role", choices=("all", "publisher", "collector"), default="all",
                     help="run only one half; several collectors may run at once")
    run.set_defaults(handler=_one_line_errors(_run))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="server YAML config")
    parser.add_argument("--group", required=True, help="gallery group")


def _one_line_errors(handler: Handler) -> Handler:
    """Turn the errors an operator can fix into one stderr line and exit status 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from agent.server.publisher import PublishError
        from agent.server.store import StoreError

        try:
            return handler(args)
        except ConfigError:
            raise  # agent.cli.main prints these with the file and the key
        except (ServerCommandError, StoreError, PublishError) as exc:
            message = str(exc)
        except sqlite3.Error as exc:
            message = (f"SQLite store failed: {exc}; check store.path and that no other "
                       "process holds the file locked")
        print(f"facenet-agent server {args.server_command}: {message}", file=sys.stderr)
        return 2

    return run


def _load_config(args: argparse.Namespace) -> ServerConfig:
    """Load the server config, apply its log level, and check --group when the command has one."""
    config = load_server_config(args.config)
    if getattr(args, "log_level", None) is None:
        logging.getLogger().setLevel(config.log_level)
    group = getattr(args, "group", None)
    if group is not None:
        try:
            check_group_name(group)
        except ValueError as exc:
            raise ServerCommandError(f"--group: {exc}") from exc
    return config


def _keygen(args: argparse.Namespace) -> int:
    from agent.server.publisher import write_key_pair

    try:
        private_path, public_path = write_key_pair(args.out)
    except FileExistsError as exc:
        raise ServerCommandError(str(exc)) from exc
    except OSError as exc:
        raise ServerCommandError(f"cannot write the key pair into {args.out}: {exc.strerror}; "
                                 "pass a folder this user can create or write with --out"
                                 ) from exc
    print(f"private key: {private_path}")
    print(f"public key (set sync.public_key on the devices): "
          f"{public_path.read_text().strip()}")
    return 0


def _open(config: ServerConfig) -> Any:
    from agent.server.store import open_store

    return open_store(config.store)


def _people_folders(folder: Path) -> list[Path]:
    """Return the per-person sub-folders of an enrol folder, or raise ServerCommandError."""
    from agent.enroll import identity_id_for

    if not folder.is_dir():
        raise ServerCommandError(f"enrol folder {folder} does not exist or is not a folder; "
                                 "pass a folder with one sub-folder of photos per person")
    try:
        people = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError as exc:
        raise ServerCommandError(f"cannot list enrol folder {folder}: {exc.strerror}") from exc
    if not people:
        raise ServerCommandError(f"enrol folder {folder} has no sub-folders; expected one "
                                 "sub-folder of photos per person")
    for person in people:
        try:
            identity_id_for(person.name)
        except ValueError as exc:
            raise ServerCommandError(str(exc)) from exc
    return people


def _enroll(args: argparse.Namespace) -> int:
    from agent.config import Config, GalleryConfig
    from agent.enroll import EnrollReport, _embed_person, identity_id_for
    from agent.pipeline import build_pipeline

    config = _load_config(args)
    # Check the folder before loading the models, which takes seconds.
    people = _people_folders(args.folder)
    agent_config = Config(device_id=config.server_id, models=config.models,
                          runtime=config.runtime, detection=config.detection,
                          alignment=config.alignment, gallery=GalleryConfig(Path(":memory:")))
    pipeline = _build_with_defaults(build_pipeline, agent_config)
    report = EnrollReport()
    failed = 0
    store = _open(config)
    try:
        model = pipeline.manifest
        store.ensure_group(args.group, model.model_id, model.embedding_size, model.metric)
        for person in people:
            identity_id = identity_id_for(person.name)
            vectors, sources = _embed_person(pipeline, person, report)
            if not vectors:
                log.warning("identity %s: no usable photo in %s; nothing stored", identity_id,
                            person)
                failed += 1
                continue
            store.put_identity(args.group, identity_id, person.name, np.stack(vectors), sources)
            print(f"{identity_id}: {len(vectors)} embeddings")
    finally:
        store.close()
    print(f"skipped photos: {len(report.skipped)}; run `server publish` to send the changes")
    return 1 if failed else 0


def _build_with_defaults(build: Any, config: Any) -> Any:
    # Config() leaves the sections that the server config lacks as None, so fill
    # them with their defaults through the validating parser.
    import dataclasses

    from agent.config import parse_config

    defaults = parse_config({"device_id": config.device_id})
    filled = dataclasses.replace(defaults, models=config.models, runtime=config.runtime,
                                 detection=config.detection, alignment=config.alignment,
                                 gallery=config.gallery)
    return build(filled)


def _read_import_file(path: Path) -> list[tuple[str, str, np.ndarray, list[str]]]:
    """Parse a JSON lines file of identities; raise ServerCommandError naming the bad line."""
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ServerCommandError(f"cannot read import file {path}: {reason}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line, parse_constant=_reject)
            vectors = np.asarray(entry["embeddings"], dtype=np.float32)
            identity_id, name = str(entry["id"]), str(entry.get("name", entry["id"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerCommandError(f"{where}: invalid entry ({exc}); expected "
                                     '{"id": ..., "name": ..., "embeddings": [[...], ...]}'
                                     ) from exc
        norms = np.linalg.norm(vectors, axis=1) if vectors.ndim == 2 else np.array([0.0])
        if not np.all(np.abs(norms - 1.0) < 1e-3):
            raise ServerCommandError(f"{where}: identity {identity_id}: embeddings must be "
                                     "L2-normalised rows")
        entries.append((identity_id, name, vectors, [where] * len(vectors)))
    return entries


def _import(args: argparse.Namespace) -> int:
    config = _load_config(args)
    entries = _read_import_file(args.file)
    store = _open(config)
    try:
        store.ensure_group(args.group, args.model_id, args.embedding_size, args.metric)
        count = store.put_identities(args.group, entries)
    finally:
        store.close()
    print(f"stored {count} identities in group {args.group}; run `server publish` to send them")
    return 0


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _remove(args: argparse.Namespace) -> int:
    config = _load_config(args)
    store = _open(config)
    try:
        removed = store.remove_identity(args.group, args.identity_id)
    finally:
        store.close()
    print(f"{args.identity_id}: {'removed' if removed else 'not found'}")
    return 0 if removed else 1


def _publisher(config: ServerConfig, role: str) -> Any:
    from agent.server.client import ServerClient
    from agent.server.publisher import GalleryPublisher, load_signing_key

    key_file = config.signing.private_key_file
    try:
        signing_key = load_signing_key(key_file)
    except ValueError as exc:
        raise ServerCommandError(f"{exc}; set signing.private_key_file to the server.key that "
                                 "`facenet-agent server keygen --out DIR` wrote") from exc
    store = _open(config)
    client = ServerClient(config.mqtt, f"facenet-server-{config.server_id}-{role}")
    publisher = GalleryPublisher(store, client, signing_key, config.mqtt.topic_prefix,
                                 config.publish)
    return client, publisher


def _publish(args: argparse.Namespace) -> int:
    config = _load_config(args)
    client, publisher = _publisher(config, "publish")
    store = publisher.store
    try:
        store.group_info(args.group)  # raises StoreError naming the fix for an unknown group
        client.start()
        if not client.wait_connected(BROKER_WAIT_S):
            raise ServerCommandError(
                f"no connection to the broker {config.mqtt.host}:{config.mqtt.port} within "
                f"{BROKER_WAIT_S:.0f} s; check mqtt.host, mqtt.port and that the broker runs")
        version = publisher.publish_group(args.group, force_snapshot=args.snapshot)
        if version is None:
            publisher.republish(args.group, include_snapshot=args.snapshot)
        current = store.group_info(args.group).version
    finally:
        client.stop()
        store.close()
    print(f"group {args.group}: version {current}" if version is not None
          else f"group {args.group}: unchanged at version {current}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from agent.server.client import ServerClient
    from agent.server.collector import SightingsCollector

    config = _load_config(args)
    if args.role == "collector" and not config.collector.enabled:
        raise ServerCommandError("--role collector but collector.enabled is false in "
                                 f"{args.config}; enable it or run another role")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    threads = []
    clients = []
    stores = []
    if args.role in ("all", "publisher"):
        if not config.publish.groups:
            log.warning("server %s: publish.groups is empty in %s, so the publisher has no "
                        "group to publish or serve", config.server_id, args.config)
        client, publisher = _publisher(config, "publisher")
        clients.append(client)
        stores.append(publisher.store)
        threads.append(threading.Thread(target=publisher.serve, args=(stop,), name="publisher"))
    if args.role in ("all", "collector") and config.collector.enabled:
        # A persistent session keeps queuing events for this collector while it restarts.
        client = ServerClient(config.mqtt, f"facenet-collector-{config.server_id}",
                              clean_start=False, session_expiry_s=3600)
        collector = SightingsCollector(_open(config), client, config.mqtt.topic_prefix,
                                       config.collector)
        collector.start()
        clients.append(client)
        stores.append(collector.store)
        threads.append(threading.Thread(target=collector.serve, args=(stop,), name="collector"))
    for client in clients:
        client.start()
    for thread in threads:
        thread.start()
    log.info("server %s: running (%s)", config.server_id, args.role)
    while not stop.wait(1.0):
        pass
    for thread in threads:
        thread.join(30.0)
    for client in clients:
        client.stop()
    for store in stores:
        store.close()
    log.info("server %s: stopped", config.server_id)
    return 0
