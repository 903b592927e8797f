"""Reports of a sweep: the knee table, a Markdown page, a JSON file and a plot.

`facenet-agent tune` prints the table and writes the plot; `facenet-agent
bench` writes all of them for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from agent.tune import Measurement, TuneResult

log = logging.getLogger(__name__)


def knee_rows(measurements: Iterable[Measurement], tolerance: float) -> list[dict]:
    """Return one row per embedder runtime and precision: its knee and its best ms per face."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for point in measurements:
        if point.role == "embedder":
            groups.setdefault((point.runtime, point.precision), []).append(point)
    rows = []
    for (runtime, precision), points in groups.items():
        best = min(points, key=lambda p: p.ms_per_face)
        knee = min((p for p in points if p.ms_per_face <= best.ms_per_face * (1 + tolerance)),
                   key=lambda p: p.batch_size)
        rejected = [f"batch {p.batch_size}: {p.rejected}"
                    for p in sorted(points, key=lambda p: p.batch_size) if p.rejected]
        rows.append({
            "runtime": runtime,
            "precision": precision,
            "knee_batch_size": knee.batch_size,
            "knee_ms_per_face": round(knee.ms_per_face, 2),
            "min_ms_per_face": round(best.ms_per_face, 2),
            "best_batch_size": best.batch_size,
            "accuracy": best.accuracy,
            "rejected": "; ".join(rejected),
        })
    return sorted(rows, key=lambda r: r["min_ms_per_face"])


def format_table(rows: list[dict], platform_name: str) -> str:
    """Format knee rows as a Markdown table, one row per runtime and precision."""
    lines = [
        "| platform | runtime | precision | batch size knee | ms per face at knee | "
        "min ms per face | accuracy % | rejected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        lines.append(
            f"| {platform_name} | {row['runtime']} | {row['precision']} | "
            f"{row['knee_batch_size']} | {row['knee_ms_per_face']:.2f} | "
            f"{row['min_ms_per_face']:.2f} | {accuracy} | {row['rejected'] or '-'} |"
        )
    return "\n".join(lines)


def format_points(measurements: Iterable[Measurement]) -> str:
    lines = ["| stage | runtime | precision | batch | ms per face | ms per batch | MB | "
             "rejected |", "|---|---|---|---|---|---|---|---|"]
    for p in measurements:
        lines.append(f"| {p.role} | {p.runtime} | {p.precision} | {p.batch_size} | "
                     f"{p.ms_per_face:.2f} | {p.batch_ms:.1f} | {p.memory_mb:.0f} | "
                     f"{p.rejected or '-'} |")
    return "\n".join(lines)


def plot_sweep(measurements: Iterable[Measurement], path: Path, title: str) -> Path:
    """Plot ms per face against batch size, one line per runtime and precision, as PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("writing the plot needs matplotlib: run 'pip install matplotlib'"
                           ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Measurement]] = {}
    for point in measurements:
        if point.role == "embedder":
            groups.setdefault(f"{point.runtime} {point.precision}", []).append(point)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(groups.items()):
        points.sort(key=lambda p: p.batch_size)
        axes.plot([p.batch_size for p in points], [p.ms_per_face for p in points],
                  marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size (faces)")
    axes.set_ylabel("ms per face")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def machine_description() -> dict[str, object]:
    import os

    from agent.tune import _cpu_model

    return {"machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "system": platform.platform()}


def write_reports(result: TuneResult, out: Path, tolerance: float,
                  extra: dict | None = None) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out`; return their paths."""
    from agent.runtimes import installed_runtimes, runtime_class

    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    rows = knee_rows(result.measurements, tolerance)
    runtimes = {name: runtime_class(name).version() for name in installed_runtimes()}
    document = {
        "machine": machine,
        "profile": result.profile,
        "runtimes": runtimes,
        "tolerance": tolerance,
        "choice": asdict(result.choice),
        "knees": rows,
        "measurements": [asdict(m) for m in result.measurements],
        **(extra or {}),
    }
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    platform_name = f"{machine['cpu']} ({machine['cpus']} CPUs)"
    choice = result.choice
    markdown = [
        f"# Benchmark on {platform_name}",
        "",
        f"Profile {result.profile}; runtimes {', '.join(f'{k} {v}' for k, v in runtimes.items())}.",
        "",
        format_table(rows, platform_name),
        "",
        f"Chosen: embedder on {choice.runtime} {choice.precision} at batch {choice.batch_size} "
        f"({choice.ms_per_face:.2f} ms per face).",
        "",
        "## Every point",
        "",
        format_points(result.measurements),
        "",
    ]
    for key, value in (extra or {}).items():
        markdown.append(f"- {key}: {value}")
    md_path = out / "bench.md"
    md_path.write_text("\n".join(markdown) + "\n", encoding="utf-8")
    png_path = plot_sweep(result.measurements, out / "bench.png",
                          f"FaceNet embedder, {platform_name}")
    log.info("wrote %s, %s and %s", json_path, md_path, png_path)
    return {"json": json_path, "markdown": md_path, "plot": png_path}
