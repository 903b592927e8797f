"""`facenet-agent tune`: pick the runtime, precision and batch size for this device.

For the embedder, the sweep covers every installed runtime of the device
profile x every precision the profile allows and the manifest has x the
profile's batch sizes. Each point is timed on random prewhitened-like input
for `seconds_per_point` seconds. Throughput rises with the batch size up to a
knee and then stays flat. So the sweep of one runtime and precision stops once
two larger batches in a row fail to beat its best by more than the tolerance,
unless `exhaustive=True` asks for every point.

A point is rejected when its batch takes longer than the profile's latency
budget, when loading and running it grows the process by more than the memory
budget, or when its precision fails the accuracy gate: a verification accuracy
more than `max_accuracy_drop` points below fp32. Among the rest, the choice is
the smallest batch whose throughput is within `tolerance` of the best point.

The detector stages run at batch sizes the frame decides, so for them only the
runtime and precision are chosen: the fastest over a few example-sized frames,
among variants whose faces match fp32's.

Results are cached in `runtime.cache_dir`/tune, keyed by the models' sha256,
the versions of the installed runtimes and the device, so `run` tunes once.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.device import DeviceProfile
from agent.models.manifest import Manifest, check_variant
from agent.runtimes import ModelSession, RuntimeOptions, create_runtime, installed_runtimes

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1
Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass(frozen=True)
class StageChoice:
    """Runtime, accelerators, precision and batch size for one model."""

    runtime: str
    precision: str
    accelerators: tuple[str, ...] = ()
    batch_size: int = 0  # 0 for the detector stages, whose batch the frame decides


@dataclass(frozen=True)
class Selection:
    embedder: StageChoice
    detector: StageChoice
    threads: int
    origin: str  # "config", "cache" or "tuned", for the log


@dataclass(frozen=True)
class Measurement:
    """One timed point of the sweep; `rejected` is why it may not be chosen ("" if it may)."""

    role: str  # "embedder" or "detector"
    runtime: str
    precision: str
    batch_size: int
    ms_per_face: float  # for the detector: ms per frame
    batch_ms: float
    memory_mb: float
    accuracy: float | None = None
    rejected: str = ""

    @property
    def faces_per_second(self) -> float:
        return 1000.0 / self.ms_per_face if self.ms_per_face > 0 else 0.0


@dataclass(frozen=True)
class TuneSettings:
    tolerance: float = 0.03  # same default as tuning.tolerance in agent/config.py
    max_accuracy_drop: float = 0.5
    seconds_per_point: float = 1.0
    exhaustive: bool = False
    detect_workers: int = 0  # service.detect_workers: the detector is timed in that layout
    # Accuracy in percent per (format, precision), measured on the configured
    # eval dataset; None uses the accuracy stored in the manifest.
    accuracy: dict[tuple[str, str], float] | None = None


@dataclass(frozen=True)
class TuneResult:
    selection: Selection
    measurements: tuple[Measurement, ...]
    key: str
    profile: str
    choice: Measurement


# Measuring


def resident_mb() -> float:
    """Return this process's resident memory in MB, from /proc (0 where it does not exist)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def time_batches(session: ModelSession, batch: np.ndarray, seconds: float) -> float:
    """Run `batch` repeatedly for about `seconds` after one warm-up run; return the median ms."""
    session.run(batch)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def embedder_input(batch_size: int, image_size: int) -> np.ndarray:
    # Prewhitened crops have zero mean and unit variance. The kernels' speed does
    # not depend on the values, so random data times the same as real faces.
    rng = np.random.default_rng(batch_size)
    return rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)


def load_variant(manifest: Manifest, role: str, choice: StageChoice, threads: int,
                 cache_dir: Path | None, verify: bool = True) -> ModelSession:
    """Load `role` in the format of `choice.runtime` and `choice.precision`."""
    from agent.models.manifest import ManifestError

    runtime = create_runtime(choice.runtime,
                             RuntimeOptions(threads, choice.accelerators, cache_dir))
    variant = manifest.variant(role, runtime.model_format, choice.precision)
    if variant is None:
        raise ManifestError(
            f"{manifest.directory} has no {choice.precision} {runtime.model_format} model for "
            f"{role}; rebuild with `facenet-agent models build` or pick another precision"
        )
    check_variant(variant, verify)
    return runtime.load(variant.path, precision=choice.precision,
                        batch_size=choice.batch_size or None, sha256=variant.sha256)


# The sweep


def candidate_runtimes(profile: DeviceProfile) -> list[tuple[str, tuple[str, ...]]]:
    """Return (runtime, accelerators) of the profile's runtimes that are installed, in order."""
    installed = set(installed_runtimes())
    candidates = []
    for choice in profile.runtimes:
        if choice.name in installed:
            candidates.append((choice.name, tuple(choice.accelerators)))
        else:
            log.info("runtime %s of profile %s is not installed; skipping it",
                     choice.name, profile.name)
    return candidates


def accuracy_of(manifest: Manifest, runtime: str, precision: str,
                settings: TuneSettings) -> float | None:
    from agent.runtimes import runtime_class

    model_format = runtime_class(runtime).model_format
    if settings.accuracy is not None:
        return settings.accuracy.get((model_format, precision))
    variant = manifest.variant("embedder", model_format, precision)
    return None if variant is None else variant.accuracy


def gate_reason(accuracy: float | None, reference: float | None, precision: str,
                max_drop: float) -> str:
    """Return why a precision fails the accuracy gate, or "" if it passes."""
    if precision == "fp32":
        return ""
    if accuracy is None or reference is None:
        return "no accuracy measured for the accuracy gate"
    drop = reference - accuracy
    if drop > max_drop:
        return f"accuracy {accuracy:.2f}% is {drop:.2f} points below fp32 (limit {max_drop})"
    return ""


def sweep_embedder(manifest: Manifest, profile: DeviceProfile, settings: TuneSettings,
                   cache_dir: Path | None = None,
                   progress: Progress | None = None) -> list[Measurement]:
    """Time the embedder over runtimes x precisions x batch sizes; see the module docstring."""
    runtimes = candidate_runtimes(profile)
    plans = []
    for runtime, accelerators in runtimes:
        from agent.runtimes import runtime_class

        model_format = runtime_class(runtime).model_format
        for precision in manifest.precisions("embedder", model_format):
            if precision in profile.precisions:
                plans.append((runtime, accelerators, precision))
    batch_sizes = sorted(set(profile.batch_sizes))
    total = len(plans) * len(batch_sizes)
    done = 0
    results: list[Measurement] = []

    for runtime, accelerators, precision in plans:
        accuracy = accuracy_of(manifest, runtime, precision, settings)
        reference = accuracy_of(manifest, runtime, "fp32", settings)
        gate = gate_reason(accuracy, reference, precision, settings.max_accuracy_drop)
        before = resident_mb()
        session = load_variant(manifest, "embedder",
                               StageChoice(runtime, precision, accelerators),
                               profile.threads, cache_dir)
        best = 0.0
        flat = 0
        for batch_size in batch_sizes:
            done += 1
            if progress:
                progress(done, total, f"embedder {runtime} {precision} batch {batch_size}")
            if flat >= 2 and not settings.exhaustive:
                continue
            batch_ms = time_batches(session, embedder_input(batch_size, manifest.image_size),
                                    settings.seconds_per_point)
            memory = max(resident_mb() - before, 0.0)
            throughput = batch_size / batch_ms
            flat = flat + 1 if throughput <= best * (1 + settings.tolerance) else 0
            best = max(best, throughput)
            reason = gate
            if batch_ms > profile.latency_budget_ms:
                reason = reason or (f"batch takes {batch_ms:.0f} ms, over the "
                                    f"{profile.latency_budget_ms:.0f} ms latency budget")
            if memory > profile.memory_budget_mb:
                reason = reason or (f"uses {memory:.0f} MB, over the "
                                    f"{profile.memory_budget_mb} MB memory budget")
            point = Measurement("embedder", runtime, precision, batch_size,
                                batch_ms / batch_size, batch_ms, memory, accuracy, reason)
            results.append(point)
            log.info("embedder %s %s batch %d: %.2f ms per face, %.0f MB%s", runtime,
                     precision, batch_size, point.ms_per_face, memory,
                     f" (rejected: {reason})" if reason else "")
        del session
        gc.collect()
    return results


def choose(measurements: list[Measurement], tolerance: float) -> Measurement:
    """Return the smallest batch within `tolerance` of the best accepted throughput.

    Ties in batch size go to the higher throughput. Raise ValueError if every
    point was rejected.
    """
    accepted = [m for m in measurements if not m.rejected]
    if not accepted:
        reasons = sorted({m.rejected for m in measurements})
        raise ValueError(f"every tuning point was rejected: {'; '.join(reasons)}")
    best = max(m.faces_per_second for m in accepted)
    near = [m for m in accepted if m.faces_per_second >= best * (1 - tolerance)]
    return min(near, key=lambda m: (m.batch_size, -m.faces_per_second))


def choose_detector(measurements: list[Measurement], tolerance: float) -> Measurement:
    """Return the first runtime in profile order whose time per frame is within `tolerance`.

    The detector has no batch to choose, and runtimes within timing noise of
    each other are better ranked by the profile's order, which puts the
    lighter runtimes first.
    """
    fastest = choose(measurements, 0.0)
    for point in measurements:
        if not point.rejected and point.ms_per_face <= fastest.ms_per_face * (1 + tolerance):
            return point
    return fastest


def detector_layout(threads: int, workers: int = 0) -> tuple[int, int]:
    """Return (detect workers, runtime threads per worker) for `threads` cores.

    `workers` 0 picks one worker per core, at most two, which is the layout
    agent/stages.py runs unless `service.detect_workers` sets another.
    """
    workers = workers or min(2, max(1, threads))
    return workers, max(1, threads // workers)


def load_detectors(manifest: Manifest, choice: StageChoice, workers: int, threads: int,
                   all_threads: int, cache_dir: Path | None) -> list[Any]:
    """Load one MTCNN detector per worker, or one shared by all on TensorFlow.

    TensorFlow sizes its thread pools once per process and its sessions may be
    called from several threads, so its workers share one detector with every
    thread. ONNX Runtime and TFLite get a detector per worker, because a TFLite
    interpreter must not be shared between threads.
    """
    from agent.detect import MtcnnDetector

    def load(count: int) -> MtcnnDetector:
        return MtcnnDetector(*(load_variant(manifest, stage, choice, count, cache_dir)
                               for stage in ("pnet", "rnet", "onet")))

    if choice.runtime == "tensorflow":
        return [load(all_threads)] * workers
    return [load(threads) for _ in range(workers)]


def time_detectors(detectors: list[Any], frames: list[np.ndarray]) -> float:
    """Detect `frames` split over one thread per detector; return the wall ms per frame."""
    import threading

    def work(index: int) -> None:
        for frame in frames[index::len(detectors)]:
            detectors[index].detect(frame)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(detectors))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - start) * 1000.0 / len(frames)


def sweep_detector(manifest: Manifest, profile: DeviceProfile, frames: list[np.ndarray],
                   seconds: float, cache_dir: Path | None = None,
                   progress: Progress | None = None,
                   detect_workers: int = 0) -> list[Measurement]:
    """Time detection on `frames` for each runtime and precision; gate on fp32's faces.

    The detectors run in the layout of the stages: `detect_workers` workers
    (0: detector_layout's choice) over the frames at once, so the time per
    frame is the wall time divided by the frames.
    """
    from agent.runtimes import runtime_class

    plans = []
    for runtime, accelerators in candidate_runtimes(profile):
        model_format = runtime_class(runtime).model_format
        for precision in manifest.precisions("pnet", model_format):
            if precision in profile.precisions and precision != "int8":
                plans.append((runtime, accelerators, precision))

    results = []
    reference: list[int] | None = None
    workers, threads = detector_layout(profile.threads, detect_workers)
    for done, (runtime, accelerators, precision) in enumerate(plans, start=1):
        if progress:
            progress(done, len(plans), f"detector {runtime} {precision}")
        choice = StageChoice(runtime, precision, accelerators)
        before = resident_mb()
        detectors = load_detectors(manifest, choice, workers, threads, profile.threads,
                                   cache_dir)
        counts = [len(detectors[0].detect(frame)) for frame in frames]
        if reference is None:
            reference = counts  # the first plan is fp32 on the preferred runtime
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while not times or time.perf_counter() < deadline:
            times.append(time_detectors(detectors, frames))
        frame_ms = float(np.median(times))
        reason = "" if counts == reference else f"finds {counts} faces, fp32 finds {reference}"
        memory = max(resident_mb() - before, 0.0)
        results.append(Measurement("detector", runtime, precision, 1, frame_ms, frame_ms,
                                   memory, None, reason))
        log.info("detector %s %s: %.1f ms per frame with %d workers%s", runtime, precision,
                 frame_ms, workers, f" (rejected: {reason})" if reason else "")
        del detectors
        gc.collect()
    return results


# Cache


def tune_key(manifest: Manifest, profile: DeviceProfile) -> str:
    """Return the cache key: models' sha256, runtime versions, device profile and CPU."""
    from agent.runtimes import runtime_class

    parts = {
        "schema": CACHE_SCHEMA,
        "models": sorted(f"{v.role}/{v.format}/{v.precision}:{v.sha256}"
                         for v in manifest.variants)
        or [m.sha256 for m in manifest.model_files()],
        "runtimes": {name: runtime_class(name).version() for name in installed_runtimes()},
        "profile": dataclasses.asdict(profile),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
    }
    canonical = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "tune" / f"{key}.json"


def save_result(cache_dir: Path, result: TuneResult) -> Path:
    path = cache_path(cache_dir, result.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "schema": CACHE_SCHEMA,
        "key": result.key,
        "profile": result.profile,
        "selection": dataclasses.asdict(result.selection),
        "choice": dataclasses.asdict(result.choice),
        "measurements": [dataclasses.asdict(m) for m in result.measurements],
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    log.info("saved tuning result %s", path)
    return path


def load_result(cache_dir: Path, key: str) -> Selection | None:
    """Return the cached selection for `key`, or None when there is none or it is unreadable."""
    path = cache_path(cache_dir, key)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        selection = document["selection"]
        return Selection(
            embedder=_stage(selection["embedder"]),
            detector=_stage(selection["detector"]),
            threads=int(selection["threads"]),
            origin="cache",
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring unreadable tuning cache %s: %s", path, error)
        return None


def _stage(entry: dict[str, Any]) -> StageChoice:
    return StageChoice(str(entry["runtime"]), str(entry["precision"]),
                       tuple(entry["accelerators"]), int(entry["batch_size"]))


# Tuning


def tune(manifest: Manifest, profile: DeviceProfile, settings: TuneSettings,
         frames: list[np.ndarray], cache_dir: Path | None = None,
         progress: Progress | None = None) -> TuneResult:
    """Sweep the embedder and the detector and return the choice; see the module docstring."""
    started = time.monotonic()
    log.info("tuning on profile %s: %s", profile.name,
             "exhaustive sweep" if settings.exhaustive else "sweep up to the knee")
    embedder_points = sweep_embedder(manifest, profile, settings, cache_dir, progress)
    detector_points = sweep_detector(manifest, profile, frames, settings.seconds_per_point,
                                     cache_dir, progress, settings.detect_workers)
    finalists = retime_finalists(manifest, profile, settings, embedder_points, cache_dir)
    choice = choose(finalists, settings.tolerance)
    detector = choose_detector(detector_points, settings.tolerance)
    accelerators = dict(candidate_runtimes(profile))
    selection = Selection(
        embedder=StageChoice(choice.runtime, choice.precision,
                             accelerators[choice.runtime], choice.batch_size),
        detector=StageChoice(detector.runtime, detector.precision,
                             accelerators[detector.runtime]),
        threads=profile.threads,
        origin="tuned",
    )
    log.info("tuned in %.0f s: embedder on %s %s at batch %d (%.2f ms per face), detector on "
             "%s %s (%.1f ms per frame)", time.monotonic() - started, choice.runtime,
             choice.precision, choice.batch_size, choice.ms_per_face, detector.runtime,
             detector.precision, detector.ms_per_face)
    return TuneResult(selection, tuple(embedder_points + detector_points),
                      tune_key(manifest, profile), profile.name, choice)


def side_by_side(sessions: list[ModelSession], batch_sizes: list[int], image_size: int,
                 seconds: float, rounds: int = 5) -> list[float]:
    """Return the median ms per face of each session, timed in alternating rounds.

    Alternating spreads the load of other processes evenly over the sessions,
    which is what makes their ratio meaningful on a shared machine.
    """
    samples: list[list[float]] = [[] for _ in sessions]
    batches = [embedder_input(b, image_size) for b in batch_sizes]
    for session, batch in zip(sessions, batches, strict=True):
        session.run(batch)
    for _ in range(rounds):
        for index, (session, batch) in enumerate(zip(sessions, batches, strict=True)):
            samples[index].append(time_batches(session, batch, seconds / rounds) / len(batch))
    return [float(np.median(s)) for s in samples]


def retime_finalists(manifest: Manifest, profile: DeviceProfile, settings: TuneSettings,
                     points: list[Measurement], cache_dir: Path | None = None,
                     groups: int = 3) -> list[Measurement]:
    """Time the batches from the knee to the best of the fastest `groups` runtimes, side by side.

    The sweep times one runtime and precision after another, so a change in
    the machine's load between them can reorder them. Alternating rounds over
    the finalists give each the same load, and the choice is made on those times.
    """
    accepted = [m for m in points if not m.rejected]
    by_group: dict[tuple[str, str], list[Measurement]] = {}
    for point in accepted:
        by_group.setdefault((point.runtime, point.precision), []).append(point)
    ranked = sorted(by_group.values(), key=lambda g: -max(p.faces_per_second for p in g))
    finalists: list[Measurement] = []
    for group in ranked[:groups]:
        best = max(group, key=lambda p: p.faces_per_second)
        knee = min((p for p in group
                    if p.faces_per_second >= best.faces_per_second * (1 - settings.tolerance)),
                   key=lambda p: p.batch_size)
        # Every batch from the knee up to the best, because the sweep's knee may
        # sit one step early when load changed during the sweep.
        finalists.extend(p for p in sorted(group, key=lambda p: p.batch_size)
                         if knee.batch_size <= p.batch_size <= best.batch_size)
    if len(finalists) < 2:
        return points

    accelerators = dict(candidate_runtimes(profile))
    sessions: dict[tuple[str, str], ModelSession] = {}
    for point in finalists:
        key = (point.runtime, point.precision)
        if key not in sessions:
            sessions[key] = load_variant(
                manifest, "embedder",
                StageChoice(point.runtime, point.precision, accelerators[point.runtime]),
                profile.threads, cache_dir)
    ms = side_by_side([sessions[(p.runtime, p.precision)] for p in finalists],
                      [p.batch_size for p in finalists], manifest.image_size,
                      settings.seconds_per_point * 2)
    retimed = [dataclasses.replace(p, ms_per_face=m, batch_ms=m * p.batch_size)
               for p, m in zip(finalists, ms, strict=True)]
    for point in retimed:
        log.info("finalist %s %s batch %d: %.2f ms per face side by side", point.runtime,
                 point.precision, point.batch_size, point.ms_per_face)
    return retimed
