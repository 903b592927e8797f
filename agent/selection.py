"""Decide which runtime, precision and batch size the pipeline uses, and log why.

The first that applies wins. An explicit `runtime.name` in the config comes
first, then the cached tuning result for these models, runtimes and device,
then a tuning run on this start (`tuning.on_start`). Otherwise the pipeline
uses the first installed runtime of the device profile, in fp32. Explicit
`runtime.precision` and `runtime.batch_size` override any of these.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from agent.config import Config
from agent.device import DeviceProfile, resolve_profile
from agent.models.manifest import Manifest
from agent.runtimes import RuntimeNotInstalledError, installed_runtimes, runtime_class
from agent.tune import (
    Selection,
    StageChoice,
    TuneSettings,
    load_result,
    save_result,
    tune,
    tune_key,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
TUNING_FRAMES = 5


def tune_settings(config: Config, manifest: Manifest, profile: DeviceProfile,
                  exhaustive: bool = False) -> TuneSettings:
    """Build the sweep settings, evaluating the accuracy gate's dataset if one is configured."""
    tuning = config.tuning
    accuracy = None
    if tuning.eval_dataset is not None:
        from agent.gate import measure_gate_accuracy

        accuracy = measure_gate_accuracy(config, manifest, profile, tuning.eval_dataset)
    return TuneSettings(tolerance=tuning.tolerance, max_accuracy_drop=tuning.max_accuracy_drop,
                        seconds_per_point=tuning.seconds_per_point, exhaustive=exhaustive,
                        accuracy=accuracy, detect_workers=config.service.detect_workers)


def tuning_frames(config: Config) -> list[np.ndarray]:
    """Return a few frames for timing the detector: photos of the eval dataset if configured."""
    from agent.images import read_image

    dataset = config.tuning.eval_dataset
    if dataset is not None:
        photos = sorted(dataset.glob("*/*.jpg"))[:TUNING_FRAMES]
        if photos:
            return [read_image(path) for path in photos]
    # NOTE: noise frames have no faces, so without tuning.eval_dataset the detector is
    # timed on P-Net alone and the fp16 face-count check cannot fail.
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(2)]


def resolve_selection(config: Config, manifest: Manifest) -> Selection:
    profile = resolve_profile(config.device.profile, config.device.profiles_dir)
    selection = _base_selection(config, manifest, profile)
    runtime = config.runtime
    embedder = selection.embedder
    if runtime.precision != "auto":
        embedder = dataclasses.replace(embedder, precision=runtime.precision)
    if runtime.batch_size:
        embedder = dataclasses.replace(embedder, batch_size=runtime.batch_size)
    threads = runtime.threads or selection.threads
    selection = dataclasses.replace(selection, embedder=embedder, threads=threads)
    log.info("runtime choice (%s, profile %s): embedder on %s %s batch %d with %s; detector "
             "on %s %s; %d threads", selection.origin, profile.name, embedder.runtime,
             embedder.precision, embedder.batch_size, list(embedder.accelerators) or "defaults",
             selection.detector.runtime, selection.detector.precision, threads)
    return selection


def _accelerators(config: Config, profile: DeviceProfile, runtime: str) -> tuple[str, ...]:
    # The config's lists override the profile's for the runtime they belong to.
    configured = {"onnxruntime": config.runtime.providers,
                  "tflite": config.runtime.delegates}.get(runtime, [])
    if configured:
        return tuple(configured)
    choice = profile.runtime_choice(runtime)
    return tuple(choice.accelerators) if choice else ()


def _base_selection(config: Config, manifest: Manifest, profile: DeviceProfile) -> Selection:
    name = config.runtime.name
    if name != "auto":
        return _fixed(config, profile, name, "config")

    cache_dir = config.runtime.cache_dir
    key = tune_key(manifest, profile)
    cached = load_result(cache_dir, key)
    if cached is not None:
        return cached
    if config.tuning.on_start:
        log.info("no tuning result for this device in %s; tuning now (tuning.on_start)",
                 cache_dir)
        result = tune(manifest, profile, tune_settings(config, manifest, profile),
                      tuning_frames(config), cache_dir, progress=_log_progress)
        save_result(cache_dir, result)
        return result.selection

    installed = set(installed_runtimes())
    for choice in profile.runtimes:
        if choice.name in installed:
            log.warning("no tuning result and tuning.on_start is off; using %s fp32, the "
                        "first installed runtime of profile %s", choice.name, profile.name)
            return _fixed(config, profile, choice.name, "profile")
    packages = ", ".join(runtime_class(c.name).package for c in profile.runtimes)
    raise RuntimeNotInstalledError(
        f"none of the runtimes of device profile {profile.name} is installed: "
        f"run 'pip install' with one of {packages}"
    )


def _fixed(config: Config, profile: DeviceProfile, name: str, origin: str) -> Selection:
    accelerators = _accelerators(config, profile, name)
    return Selection(
        embedder=StageChoice(name, "fp32", accelerators, DEFAULT_BATCH_SIZE),
        detector=StageChoice(name, "fp32", accelerators),
        threads=profile.threads,
        origin=origin,
    )


def _log_progress(done: int, total: int, what: str) -> None:
    log.info("tuning %d/%d: %s", done, total, what)
