"""`facenet-agent server ...`: keys, enrolment, import, publication and the server process."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ServerConfig, load_server_config

log = logging.getLogger(__name__)


def add_server_commands(commands: Any) -> None:
    """Register the `server` sub-commands on the top-level parser's subparsers."""
    server = commands.add_parser("server", help="central side: enrol, publish galleries to "
                                                "device groups, collect sightings")
    sub = server.add_subparsers(dest="server_command", required=True)

    keygen = sub.add_parser("keygen", help="write a new Ed25519 key pair: server.key and "
                                           "server.pub")
    keygen.add_argument("--out", type=Path, required=True, help="folder for the two files")
    keygen.set_defaults(handler=_keygen)

    enroll = sub.add_parser("enroll", help="embed DIR/<person>/*.jpg and store the identities")
    enroll.add_argument("folder", type=Path, help="folder with one sub-folder per person")
    _common(enroll)
    enroll.set_defaults(handler=_enroll)

    load = sub.add_parser("import", help="store embeddings computed elsewhere, from JSON lines "
                                         '{"id", "name", "embeddings": [[...], ...]}')
    load.add_argument("file", type=Path, help="JSON lines file")
    load.add_argument("--model-id", required=True,
                      help="model that computed the embeddings; must match the group's")
    load.add_argument("--embedding-size", type=int, default=128)
    load.add_argument("--metric", default="euclidean")
    _common(load)
    load.set_defaults(handler=_import)

    remove = sub.add_parser("remove", help="delete an identity from a group")
    remove.add_argument("identity_id")
    _common(remove)
    remove.set_defaults(handler=_remove)

    publish = sub.add_parser("publish", help="publish the group's changes as a new version")
    publish.add_argument("--snapshot", action="store_true",
                         help="also publish a full snapshot at that version")
    _common(publish)
    publish.set_defaults(handler=_publish)

    run = sub.add_parser("run", help="publish changes, answer resync requests and collect "
                                     "sightings until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="server YAML config")
    run.add_argument("--role", choices=("all", "publisher", "collector"), default="all",
                     help="run only one half; several collectors may run at once")
    run.set_defaults(handler=_run)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="server YAML config")
    parser.add_argument("--group", required=True, help="gallery group")


def _keygen(args: argparse.Namespace) -> int:
    from agent.server.publisher import write_key_pair

    private_path, public_path = write_key_pair(args.out)
    print(f"private key: {private_path}")
    print(f"public key (set sync.public_key on the devices): "
          f"{public_path.read_text().strip()}")
    return 0


def _open(config: ServerConfig) -> Any:
    from agent.server.store import open_store

    return open_store(config.store)


def _enroll(args: argparse.Namespace) -> int:
    from agent.config import Config, GalleryConfig
    from agent.enroll import EnrollReport, _embed_person, identity_id_for
    from agent.pipeline import build_pipeline

    config = load_server_config(args.config)
    agent_config = Config(device_id=config.server_id, models=config.models,
                          runtime=config.runtime, detection=config.detection,
                          alignment=config.alignment, gallery=GalleryConfig(Path(":memory:")))
    pipeline = _build_with_defaults(build_pipeline, agent_config)
    store = _open(config)
    model = pipeline.manifest
    store.ensure_group(args.group, model.model_id, model.embedding_size, model.metric)
    report = EnrollReport()
    people = sorted(p for p in args.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise SystemExit(f"enrol folder {args.folder} has no sub-folders, one per person")
    failed = 0
    for person in people:
        identity_id = identity_id_for(person.name)
        vectors, sources = _embed_person(pipeline, person, report)
        if not vectors:
            log.warning("identity %s: no usable photo in %s; nothing stored", identity_id, person)
            failed += 1
            continue
        store.put_identity(args.group, identity_id, person.name, np.stack(vectors), sources)
        print(f"{identity_id}: {len(vectors)} embeddings")
    print(f"skipped photos: {len(report.skipped)}; run `server publish` to send the changes")
    store.close()
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


def _import(args: argparse.Namespace) -> int:
    config = load_server_config(args.config)
    store = _open(config)
    store.ensure_group(args.group, args.model_id, args.embedding_size, args.metric)
    entries = []
    with args.file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line, parse_constant=_reject)
                vectors = np.asarray(entry["embeddings"], dtype=np.float32)
                identity_id, name = str(entry["id"]), str(entry.get("name", entry["id"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{args.file}:{number}: invalid entry: {exc}") from exc
            norms = np.linalg.norm(vectors, axis=1) if vectors.ndim == 2 else np.array([0.0])
            if not np.all(np.abs(norms - 1.0) < 1e-3):
                raise SystemExit(f"{args.file}:{number}: identity {identity_id}: embeddings "
                                 "must be L2-normalised rows")
            entries.append((identity_id, name, vectors, [f"{args.file}:{number}"] * len(vectors)))
    count = store.put_identities(args.group, entries)
    print(f"stored {count} identities in group {args.group}; run `server publish` to send them")
    store.close()
    return 0


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _remove(args: argparse.Namespace) -> int:
    config = load_server_config(args.config)
    store = _open(config)
    removed = store.remove_identity(args.group, args.identity_id)
    store.close()
    print(f"{args.identity_id}: {'removed' if removed else 'not found'}")
    return 0 if removed else 1


def _publisher(config: ServerConfig, role: str) -> Any:
    from agent.server.client import ServerClient
    from agent.server.publisher import GalleryPublisher, load_signing_key

    client = ServerClient(config.mqtt, f"facenet-server-{config.server_id}-{role}")
    publisher = GalleryPublisher(_open(config), client, load_signing_key(
        config.signing.private_key_file), config.mqtt.topic_prefix, config.publish)
    return client, publisher


def _publish(args: argparse.Namespace) -> int:
    config = load_server_config(args.config)
    client, publisher = _publisher(config, "publish")
    client.start()
    try:
        if not client.wait_connected(30.0):
            raise SystemExit(f"no connection to the broker {config.mqtt.host}:"
                             f"{config.mqtt.port} within 30 s")
        version = publisher.publish_group(args.group, force_snapshot=args.snapshot)
        if version is None:
            publisher.republish(args.group, include_snapshot=args.snapshot)
    finally:
        client.stop()
        publisher.store.close()
    print(f"group {args.group}: version {publisher.store.group_info(args.group).version}"
          if version else f"group {args.group}: unchanged")
    return 0


def _run(args: argparse.Namespace) -> int:
    from agent.server.client import ServerClient
    from agent.server.collector import SightingsCollector

    config = load_server_config(args.config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    threads = []
    clients = []
    if args.role in ("all", "publisher"):
        client, publisher = _publisher(config, "publisher")
        clients.append(client)
        threads.append(threading.Thread(target=publisher.serve, args=(stop,), name="publisher"))
    if args.role in ("all", "collector") and config.collector.enabled:
        # A persistent session keeps queuing events for this collector while it restarts.
        client = ServerClient(config.mqtt, f"facenet-collector-{config.server_id}",
                              clean_start=False, session_expiry_s=3600)
        collector = SightingsCollector(_open(config), client, config.mqtt.topic_prefix,
                                       config.collector)
        collector.start()
        clients.append(client)
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
    log.info("server %s: stopped", config.server_id)
    return 0
