"""Time gallery sync over a real Mosquitto on loopback: a large snapshot, then small deltas.

The server side (store, publisher, MQTT client) runs in this process. The agent
side (gallery, sync worker, MQTT client, and with --models the whole recognition
pipeline) runs in a child process, so that its memory is measured alone. The
child prints each gallery version as it is applied, with the time and its
memory. Each latency runs from the start of `publish_group` (diff, encode, sign,
commit, send) to the child's applied version; both read the same clock.

    python benchmarks/gallery_sync.py [--identities 100000] [--deltas 5]
        [--delta-identities 100] [--models .cache/models] [--index-mode auto]

The device profiles' memory budgets are read from device_profiles/*.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from common import machine_line, start_mosquitto, unit_rows  # noqa: E402

GROUP = "bench"
PREFIX = "facenet"
DIMENSION = 128


def memory_kib() -> tuple[int, int]:
    """Return this process's (resident, peak resident) memory in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# Agent side, in the child process


def run_agent(args: argparse.Namespace) -> None:
    from agent.config import SyncConfig
    from agent.gallery import Gallery
    from agent.gallery_sync import GallerySync
    from agent.mqtt import MqttPublisher

    model_id = args.model_id
    if args.models:
        from agent.config import parse_config
        from agent.pipeline import build_pipeline

        config = parse_config({
            "device_id": "bench-agent",
            "models": {"dir": str(args.models)},
            "gallery": {"path": str(args.gallery)},
            "matching": {"index": args.index_mode},
        })
        pipeline = build_pipeline(config)
        gallery = pipeline.gallery
        model_id = pipeline.manifest.model_id
    else:
        gallery = Gallery(args.gallery, model_id, DIMENSION, index_mode=args.index_mode)
    client = MqttPublisher("127.0.0.1", args.port, f"bench-agent-{uuid.uuid4().hex[:6]}",
                           status_topic=f"{PREFIX}/bench-agent/status")
    sync = GallerySync(gallery=gallery, publisher=client, device_id="bench-agent",
                       topic_prefix=PREFIX, settings=SyncConfig(group=GROUP,
                                                                public_key=args.public_key),
                       model_id=model_id, embedding_size=DIMENSION, metric="euclidean")
    client.start()
    sync.start()
    if not client.wait_connected(30):
        raise SystemExit("agent: no connection to the broker")
    rss, peak = memory_kib()
    print(json.dumps({"ready": True, "rss_kib": rss, "hwm_kib": peak}), flush=True)
    seen = gallery.version
    while seen < args.last_version:
        time.sleep(0.002)
        if gallery.version != seen:
            seen = gallery.version
            applied_at = time.time()
            rss, peak = memory_kib()
            print(json.dumps({"version": seen, "time": applied_at, "rss_kib": rss,
                              "hwm_kib": peak, "identities": gallery.identity_count}),
                  flush=True)
    if args.match_batch:
        # Measure with the approximate index in memory when the gallery builds one.
        deadline = time.monotonic() + 1800
        while gallery._index_building and time.monotonic() < deadline:
            time.sleep(0.5)
        queries = unit_rows(32, DIMENSION, seed=9)
        gallery.match(queries, threshold=1.1, metric="euclidean")
        rss, peak = memory_kib()
        print(json.dumps({"matched": True, "rss_kib": rss, "hwm_kib": peak,
                          "approximate": gallery.approximate_ready}), flush=True)
    sync.stop()
    client.stop(timeout_s=1.0)
    gallery.close()


# Server side, in this process


def read_line(child: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    assert child.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"agent exited with {child.wait()}")
        if line.startswith("{"):
            return dict(json.loads(line))
    raise SystemExit(f"agent sent nothing for {timeout_s} s")


def profile_budgets() -> dict[str, int]:
    budgets = {}
    for path in sorted((REPO / "device_profiles").glob("*.yaml")):
        profile = yaml.safe_load(path.read_text())
        budgets[profile["name"]] = int(profile["memory_budget_mb"])
    return budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100_000,
                        help="identities in the snapshot, one embedding each")
    parser.add_argument("--deltas", type=int, default=5, help="deltas published after it")
    parser.add_argument("--delta-identities", type=int, default=100,
                        help="identities added by each delta")
    parser.add_argument("--models", type=Path, default=None,
                        help="model folder: the child loads the recognition pipeline too, "
                             "so that its memory includes the models")
    parser.add_argument("--index-mode", default="auto", choices=("exact", "approximate", "auto"),
                        help="the agent's matching.index")
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gallery", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--public-key", help=argparse.SUPPRESS)
    parser.add_argument("--model-id", default="bench-model", help=argparse.SUPPRESS)
    parser.add_argument("--last-version", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--match-batch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        run_agent(args)
        return
    with tempfile.TemporaryDirectory(prefix="facenet-sync-bench-") as folder:
        run_server(args, Path(folder))


def run_server(args: argparse.Namespace, folder: Path) -> None:
    import base64

    from nacl.signing import SigningKey

    from agent.config import MqttConfig, PublishConfig
    from agent.server.client import ServerClient
    from agent.server.publisher import GalleryPublisher
    from agent.server.store import SqliteStore

    print(f"# {machine_line()}")
    model_id = "bench-model"
    if args.models:
        from agent.models.manifest import load_manifest

        model_id = load_manifest(args.models, verify=False).model_id
    broker = start_mosquitto(folder)
    store = SqliteStore(folder / "server.db")
    store.ensure_group(GROUP, model_id, DIMENSION, "euclidean")
    started = time.monotonic()
    vectors = unit_rows(args.identities, DIMENSION, seed=1)
    store.put_identities(GROUP, ((f"person-{i:07d}", f"Person {i}", vectors[i:i + 1],
                                  ["bench"]) for i in range(args.identities)))
    print(f"# server store filled with {args.identities} identities in "
          f"{time.monotonic() - started:.1f} s (not part of the timings)", flush=True)

    key = SigningKey.generate()
    client = ServerClient(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX),
                          "bench-server")
    settings = PublishConfig(groups=[GROUP])
    publisher = GalleryPublisher(store, client, key, PREFIX, settings)
    client.start()
    assert client.wait_connected(30)

    child = subprocess.Popen(
        [sys.executable, __file__, "--agent", "--port", str(broker.port), "--gallery",
         str(folder / "gallery.db"), "--public-key", base64.b64encode(bytes(key.verify_key))
         .decode(), "--model-id", model_id, "--last-version", str(1 + args.deltas),
         "--index-mode", args.index_mode, "--match-batch",
         *(["--models", str(args.models)] if args.models else [])],
        stdout=subprocess.PIPE, text=True)
    try:
        ready = read_line(child, 300)
        print(f"agent ready: RSS {ready['rss_kib'] / 1024:.0f} MiB, chunk_bytes "
              f"{settings.chunk_bytes}, index mode {args.index_mode}", flush=True)

        published_at = time.time()
        publisher.publish_group(GROUP)
        sent = time.time() - published_at
        applied = read_line(child, 600)
        snapshot_s = applied["time"] - published_at
        manifest = publisher._stored_manifest(GROUP)
        assert manifest is not None
        print(f"snapshot of {args.identities} identities ({manifest.snapshot.size / 1e6:.1f} MB, "
              f"{manifest.snapshot.chunk_count} chunks, manifest "
              f"{len(store.group_info(GROUP).manifest or b'')} bytes): published and acknowledged "
              f"in {sent:.2f} s, applied by the agent {snapshot_s:.2f} s after the publish "
              f"started; agent RSS {applied['rss_kib'] / 1024:.0f} MiB; load "
              f"{os.getloadavg()[0]:.1f}", flush=True)

        latencies = []
        for number in range(args.deltas):
            extra = unit_rows(args.delta_identities, DIMENSION, seed=100 + number)
            store.put_identities(GROUP, ((f"delta-{number}-{i:04d}", "New", extra[i:i + 1],
                                          ["bench"]) for i in range(args.delta_identities)))
            published_at = time.time()
            publisher.publish_group(GROUP)
            applied = read_line(child, 120)
            latencies.append(applied["time"] - published_at)
            print(f"delta {number + 1} of {args.delta_identities} identities: applied "
                  f"{latencies[-1] * 1e3:.0f} ms after the publish started; load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
        if latencies:
            print(f"deltas: min {min(latencies) * 1e3:.0f} ms, median "
                  f"{sorted(latencies)[len(latencies) // 2] * 1e3:.0f} ms, max "
                  f"{max(latencies) * 1e3:.0f} ms")

        final = read_line(child, 1900)
        peak_mib = final["hwm_kib"] / 1024
        print(f"agent memory after matching a batch of 32 (approximate index in use: "
              f"{final['approximate']}): RSS {final['rss_kib'] / 1024:.0f} MiB, peak "
              f"{peak_mib:.0f} MiB")
        for name, budget in profile_budgets().items():
            verdict = "within" if peak_mib <= budget else "OVER"
            print(f"  profile {name}: budget {budget} MB, peak {verdict}")
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
        client.stop()
        store.close()
        broker.stop()


if __name__ == "__main__":
    main()
