"""Command line for `facenet-agent tune`, `bench` and `eval`.

All three take `--config` (the agent's YAML) or `--models DIR` for a quick
run with defaults, and use the device profile that the config names or that
detection finds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from agent.config import Config, load_config, parse_config

log = logging.getLogger(__name__)


def add_tuning_commands(commands: Any) -> None:
    """Register the tune, bench and eval sub-commands on the main parser's sub-parsers."""
    tune = commands.add_parser(
        "tune", help="sweep runtime x precision x batch size, cache and print the choice")
    _add_common(tune)
    tune.add_argument("--exhaustive", action="store_true",
                      help="measure every batch size, not only up to the knee")
    tune.add_argument("--plot", type=Path, default=None,
                      help="PNG of ms per face against batch size (default: next to the cache "
                           "file)")
    tune.set_defaults(handler=_tune)

    bench = commands.add_parser(
        "bench", help="runtimes: the tuning sweep and an exhaustive sweep; pipeline: the "
                      "whole pipeline's speed on a folder of images. Both write JSON and "
                      "Markdown")
    bench.add_argument("what", nargs="?", default="runtimes", choices=("runtimes", "pipeline"),
                       help="what to measure (default: runtimes)")
    _add_common(bench)
    bench.add_argument("--out", type=Path, required=True, help="folder for the reports")
    pipeline = bench.add_argument_group("bench pipeline")
    pipeline.add_argument("--input", type=Path, default=None,
                          help="folder of images, searched recursively (required for pipeline)")
    pipeline.add_argument("--frame-size", default="640x480",
                          help="letterbox each image to WIDTHxHEIGHT like a video frame; "
                               "'none' keeps the photos as they are (default: 640x480)")
    pipeline.add_argument("--repeat", type=int, default=2,
                          help="passes over the input for the throughput run (default: 2)")
    pipeline.add_argument("--overload-fps", type=float, default=30.0,
                          help="frames per second the overload run offers; 0 skips it "
                               "(default: 30)")
    pipeline.add_argument("--overload-seconds", type=float, default=30.0,
                          help="length of the overload run in seconds (default: 30)")
    bench.set_defaults(handler=_bench)

    evaluate = commands.add_parser(
        "eval", help="accuracy, TAR at a FAR, ROC curve and best threshold of each runtime "
                     "and precision")
    evaluate.add_argument("dataset", type=Path,
                          help="folder of identities (DIR/<person>/*.jpg) or a pairs file of "
                               "'photo_a photo_b 1|0' lines")
    _add_common(evaluate)
    evaluate.add_argument("--runtime", default=None,
                          help="evaluate only this runtime (default: every installed one of "
                               "the device profile)")
    evaluate.add_argument("--precision", default=None, choices=("fp32", "fp16", "int8"),
                          help="evaluate only this precision (default: all built and allowed)")
    evaluate.add_argument("--far", type=float, default=1e-3,
                          help="false accept rate at which to report TAR (default: 0.001)")
    evaluate.add_argument("--roc", type=Path, default=None, help="write the ROC curves as PNG")
    evaluate.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    evaluate.set_defaults(handler=_eval)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="agent YAML config")
    parser.add_argument("--models", type=Path, default=None,
                        help="model folder; overrides models.dir of the config")
    parser.add_argument("--profile", default=None,
                        help="device profile name; overrides device.profile of the config")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds of timed runs per point; overrides "
                             "tuning.seconds_per_point")


def _config(args: argparse.Namespace) -> Config:
    import dataclasses

    if args.config is not None:
        config = load_config(args.config)
    else:
        config = parse_config({"device_id": "tune"})

    models = dataclasses.replace(config.models, dir=args.models or config.models.dir)
    device = dataclasses.replace(config.device, profile=args.profile or config.device.profile)
    tuning = config.tuning
    if args.seconds is not None:
        tuning = dataclasses.replace(tuning, seconds_per_point=args.seconds)
    return dataclasses.replace(config, models=models, device=device, tuning=tuning)


def _progress(done: int, total: int, what: str) -> None:
    # One line per point, because the sweep takes minutes and each line names its point.
    print(f"[{done:>3}/{total}] {what}", file=sys.stderr, flush=True)


def _setup(args: argparse.Namespace) -> tuple[Config, Any, Any]:
    from agent.device import resolve_profile
    from agent.models.manifest import load_manifest

    config = _config(args)
    manifest = load_manifest(config.models.dir, verify=config.models.verify_sha256)
    profile = resolve_profile(config.device.profile, config.device.profiles_dir)
    return config, manifest, profile


def _tune(args: argparse.Namespace) -> int:
    from agent.bench import format_table, knee_rows, machine_description, plot_sweep
    from agent.selection import tune_settings, tuning_frames
    from agent.tune import cache_path, save_result, tune

    config, manifest, profile = _setup(args)
    settings = tune_settings(config, manifest, profile, exhaustive=args.exhaustive)
    result = tune(manifest, profile, settings, tuning_frames(config),
                  config.runtime.cache_dir, progress=_progress)
    saved = save_result(config.runtime.cache_dir, result)
    plot = args.plot or cache_path(config.runtime.cache_dir, result.key).with_suffix(".png")
    plot_sweep(result.measurements, plot, f"FaceNet embedder, profile {profile.name}")

    machine = machine_description()
    print(format_table(knee_rows(result.measurements, settings.tolerance),
                       f"{machine['cpu']} ({machine['cpus']} CPUs)"))
    choice, detector = result.choice, result.selection.detector
    print(f"\nchosen: embedder on {choice.runtime} {choice.precision} at batch "
          f"{choice.batch_size} ({choice.ms_per_face:.2f} ms per face); detector on "
          f"{detector.runtime} {detector.precision}")
    print(f"cached in {saved}; plot {plot}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "pipeline":
        return _bench_pipeline(args)
    import dataclasses

    from agent.bench import write_reports
    from agent.selection import tune_settings, tuning_frames
    from agent.tune import StageChoice, choose, load_variant, side_by_side, sweep_embedder, tune

    config, manifest, profile = _setup(args)
    settings = tune_settings(config, manifest, profile)
    tuned = tune(manifest, profile, settings, tuning_frames(config), config.runtime.cache_dir,
                 progress=_progress)
    exhaustive = sweep_embedder(manifest, profile, dataclasses.replace(settings, exhaustive=True),
                                config.runtime.cache_dir, _progress)
    best = choose(exhaustive, 0.0)

    # Time both picks again, alternating, so that both see the same machine load.
    picks = [tuned.choice, best]
    sessions = [load_variant(manifest, "embedder",
                             StageChoice(p.runtime, p.precision, (), p.batch_size),
                             profile.threads, config.runtime.cache_dir) for p in picks]
    ms = side_by_side(sessions, [p.batch_size for p in picks], manifest.image_size,
                      settings.seconds_per_point)
    ratio = ms[1] / ms[0]  # tuned throughput / best throughput
    extra = {
        "tune_pick": f"{picks[0].runtime} {picks[0].precision} batch {picks[0].batch_size}: "
                     f"{ms[0]:.2f} ms per face",
        "exhaustive_best": f"{picks[1].runtime} {picks[1].precision} batch "
                           f"{picks[1].batch_size}: {ms[1]:.2f} ms per face",
        "tune_throughput_vs_exhaustive_best": round(ratio, 4),
        "exhaustive_sweep": [dataclasses.asdict(m) for m in exhaustive],
    }
    paths = write_reports(tuned, args.out, settings.tolerance, extra)
    print(f"tune pick {extra['tune_pick']}; exhaustive best {extra['exhaustive_best']}; "
          f"throughput ratio {ratio:.3f}")
    for path in paths.values():
        print(path)
    return 0


# Larger than any camera frame this agent expects; 8192 x 8192 RGB is 192 MiB.
MAX_FRAME_SIDE = 8192


def parse_frame_size(text: str) -> tuple[int, int] | None:
    """Parse 'WIDTHxHEIGHT' into (width, height), or 'none' into None."""
    if text.lower() == "none":
        return None
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"invalid --frame-size {text!r}: expected WIDTHxHEIGHT such as "
                         "640x480, or none") from None
    if not (16 <= width <= MAX_FRAME_SIDE and 16 <= height <= MAX_FRAME_SIDE):
        raise ValueError(f"invalid --frame-size {text!r}: each side must be 16 to "
                         f"{MAX_FRAME_SIDE} pixels")
    return width, height


def _bench_pipeline(args: argparse.Namespace) -> int:
    from agent.bench_pipeline import run_bench

    if args.input is None or not args.input.is_dir():
        print(f"facenet-agent: bench pipeline needs --input, a folder of images; got "
              f"{args.input}", file=sys.stderr)
        return 2
    try:
        frame_size = parse_frame_size(args.frame_size)
    except ValueError as exc:
        print(f"facenet-agent: {exc}", file=sys.stderr)
        return 2
    problems = [message for failed, message in (
        (args.repeat < 1, f"invalid --repeat {args.repeat}: expected 1 or more passes"),
        (args.overload_fps < 0, f"invalid --overload-fps {args.overload_fps}: expected 0 "
                                "(skip the run) or more frames per second"),
        (args.overload_seconds <= 0, f"invalid --overload-seconds {args.overload_seconds}: "
                                     "expected more than 0 seconds"),
    ) if failed]
    if problems:
        print(f"facenet-agent: {problems[0]}", file=sys.stderr)
        return 2
    config = _config(args)
    if args.config is None:
        # Without a config, the gallery goes to a throw-away file, not /var/lib.
        import dataclasses
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="facenet-bench-"))
        config = dataclasses.replace(config, gallery=dataclasses.replace(
            config.gallery, path=scratch / "gallery.db"))
    try:
        report = run_bench(config, args.input, args.out, frame_size, args.repeat,
                           args.overload_fps, args.overload_seconds)
    except ValueError as exc:
        print(f"facenet-agent: {exc}", file=sys.stderr)
        return 2
    throughput = report["throughput"]
    print(f"{throughput['images_per_s']} images/s, {throughput['faces_per_s']} faces/s, "
          f"p50 {throughput['p50_ms']} ms, p95 {throughput['p95_ms']} ms; embed stage at "
          f"{report['embed_stage']['ratio']:.0%} of the standalone session")
    print(args.out / "pipeline.md")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from agent.evaluate import plot_roc
    from agent.gate import evaluate_variants, gate_plans
    from agent.tune import gate_reason

    config, manifest, profile = _setup(args)
    plans = [p for p in gate_plans(manifest, profile)
             if (args.runtime is None or p.runtime == args.runtime)
             and (args.precision is None or p.precision == args.precision)]
    if not plans:
        print(f"facenet-agent: no installed runtime and built precision match "
              f"--runtime {args.runtime} --precision {args.precision} on profile "
              f"{profile.name}", file=sys.stderr)
        return 2
    results = evaluate_variants(manifest, args.dataset, plans,
                                config.runtime.threads or profile.threads,
                                config.alignment.margin, args.far, config.runtime.cache_dir)
    reference = {r.runtime: r.evaluation.accuracy for r in results if r.precision == "fp32"}
    rows = []
    print("| runtime | precision | accuracy % | best threshold | TAR | at FAR | AUC | gate |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        e = r.evaluation
        gate = gate_reason(e.accuracy, reference.get(r.runtime), r.precision,
                           config.tuning.max_accuracy_drop) or "passes"
        print(f"| {r.runtime} | {r.precision} | {e.accuracy:.2f} | {e.threshold:.3f} | "
              f"{e.tar:.3f} | {e.far:.4f} | {e.auc:.4f} | {gate} |")
        rows.append({"runtime": r.runtime, "precision": r.precision, **e.summary(),
                     "gate": gate})
    if args.roc:
        plot_roc({f"{r.runtime} {r.precision}": r.evaluation for r in results}, args.roc)
        print(f"ROC curves: {args.roc}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.json}")
    return 0
