"""Helpers shared by the benchmark scripts: synthetic galleries, timing and a machine line."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def unit_rows(rows: int, dimension: int, seed: int) -> np.ndarray:
    """Random float32 vectors spread uniformly on the unit sphere."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dimension), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def probes_near(gallery: np.ndarray, count: int, distance: float, seed: int) -> np.ndarray:
    """Unit vectors at about `distance` (Euclidean) from `count` random gallery rows.

    FaceNet puts two photos of one person at about 0.5 to 0.9 apart, and the
    agent's default match threshold is 1.1.
    """
    rng = np.random.default_rng(seed)
    picked = gallery[rng.choice(len(gallery), size=count, replace=False)]
    noise = rng.standard_normal(picked.shape, dtype=np.float32)
    # Remove the component along the row, so the angle sets the distance exactly.
    noise -= np.sum(noise * picked, axis=1, keepdims=True) * picked
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    angle = 2 * np.arcsin(distance / 2)
    probes = np.cos(angle) * picked + np.sin(angle) * noise
    return (probes / np.linalg.norm(probes, axis=1, keepdims=True)).astype(np.float32)


def exact_nearest(gallery: np.ndarray, queries: np.ndarray, block: int = 256) -> np.ndarray:
    return np.concatenate([
        np.argmax(queries[i:i + block] @ gallery.T, axis=1)
        for i in range(0, len(queries), block)
    ])


def best_of(repeats: int, action: Callable[[], object]) -> tuple[float, float]:
    """Run `action` `repeats` times; return (min, median) wall seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[0], times[len(times) // 2]


def machine_line() -> str:
    load = os.getloadavg()
    cpus = len(os.sched_getaffinity(0))
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {cpus} usable cores, Python {platform.python_version()}, "
            f"numpy {np.__version__}, load average {load[0]:.1f} at start")


@dataclass
class Broker:
    """A Mosquitto process listening on 127.0.0.1:`port`."""

    port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_mosquitto(folder: Path) -> Broker:
    """Start Mosquitto on a free loopback port, without persistence, logging into `folder`."""
    executable = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = (folder / "mosquitto.log").open("wb")
    process = subprocess.Popen([executable, "-c", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                return Broker(port, process)
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"mosquitto did not listen on port {port}; see {folder / 'mosquitto.log'}")
