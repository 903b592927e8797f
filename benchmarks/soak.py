"""Soak test: run the real agent for a long time and watch its resident memory.

    python benchmarks/soak.py --models .cache/models --photo PHOTO.jpg --duration 3600

It writes a video of one face moving in and out of view, starts a mosquitto on a
free loopback port, and runs `python -m agent run` over the video in appearance
mode. Every `--outage-every` seconds it stops the broker for `--outage` seconds,
so the outbox fills and drains. Every `--sample` seconds it records the agent's
VmRSS. At the end it sends SIGTERM and prints one line per sample and the growth
from the first sample after `--warmup` seconds to the last, which the acceptance
criterion wants under 5 %. Needs the mosquitto binary and built models.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.broker import MosquittoBroker, find_mosquitto  # noqa: E402


def make_video(photo: Path, path: Path, frames: int) -> None:
    """Write a face that is in view for 40 frames and out of view for 20, repeated."""
    face = cv2.imread(str(photo))
    face = cv2.resize(face, (160, int(160 * face.shape[0] / face.shape[1])))
    height, width = face.shape[:2]
    blank = np.full_like(face, 90)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    for index in range(frames):
        writer.write(face if index % 60 < 40 else blank)
    writer.release()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="built models folder")
    parser.add_argument("--photo", type=Path, required=True, help="a photo with one face")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds to run")
    parser.add_argument("--warmup", type=float, default=300.0,
                        help="seconds before the reference sample")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--outage-every", type=float, default=600.0,
                        help="seconds between broker outages; 0 disables them")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds each outage lasts")
    parser.add_argument("--frames", type=int, default=60_000,
                        help="frames in the video; the run ends early if the agent reaches the end")
    args = parser.parse_args()

    executable = find_mosquitto()
    if executable is None:
        print("mosquitto not found; apt-get install mosquitto", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="facenet-soak-"))
    video = work / "soak.avi"
    make_video(args.photo, video, args.frames)
    broker = MosquittoBroker(work / "mosquitto", executable=executable)
    broker.start()
    config = work / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "soak-01",
        "models": {"dir": str(args.models.resolve())},
        "gallery": {"path": str(work / "gallery.db")},
        "source": {"uri": str(video)},
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_delay_s": 0.5,
                 "reconnect_max_delay_s": 5.0},
        "outbox": {"path": str(work / "outbox.db")},
        "events": {"mode": "appearance"},
        "health": {"heartbeat_interval_s": 5.0},
        "log_level": "WARNING",
    }))
    log_file = (work / "agent.log").open("w")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
    print(f"machine: {platform.machine()}, {platform.processor() or 'unknown cpu'}, "
          f"Python {platform.python_version()}; work folder {work}")
    started = time.monotonic()
    samples: list[tuple[float, int, str]] = []
    next_outage = args.outage_every or float("inf")
    try:
        while time.monotonic() - started < args.duration and agent.poll() is None:
            elapsed = time.monotonic() - started
            state = "up" if broker.is_running() else "down"
            if broker.is_running() and elapsed >= next_outage:
                broker.stop()
                state = "down"
            elif not broker.is_running() and elapsed >= next_outage + args.outage:
                broker.start()
                next_outage += args.outage_every
                state = "up"
            samples.append((elapsed, rss_kb(agent.pid), state))
            print(f"{elapsed:8.0f} s  RSS {samples[-1][1]:8d} KiB  broker {state}", flush=True)
            time.sleep(args.sample)
    finally:
        if not broker.is_running():
            broker.start()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=120)
        broker.close()

    reference = next((s for s in samples if s[0] >= args.warmup), samples[0])
    last = samples[-1]
    growth = 100.0 * (last[1] - reference[1]) / reference[1]
    print(f"agent exit status {code}; RSS {reference[1]} KiB at {reference[0]:.0f} s, "
          f"{last[1]} KiB at {last[0]:.0f} s: growth {growth:+.1f} % "
          f"(criterion: under 5 %)")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if growth < 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
