"""Merge the runs of benchmarks/pipelines.sh into OUT/pipelines.md and OUT/pipelines.svg.

Reads OUT/runs.jsonl (one line per pipeline run, from benchmarks/pipelines.py
--json) and OUT/pipeline.json (from `facenet-agent bench pipeline`). Ratios
use the agent's slower run of each input, because the agent ran both first
and last and the machine's load may have changed in between.

Usage: python benchmarks/pipelines_report.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load_runs(out: Path) -> list[dict]:
    lines = (out / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def slowest(runs: list[dict], pipeline: str, input_kind: str) -> dict | None:
    """Return the run of `pipeline` on `input_kind` with the lowest faces/s, or None."""
    matching = [r for r in runs if r["pipeline"].startswith(pipeline) and r["input"] == input_kind]
    return min(matching, key=lambda r: r["faces_per_s"]) if matching else None


def accuracy_cell(run: dict, runs: list[dict]) -> str:
    # Accuracy is measured once per pipeline, on the photos, during its video run.
    scored = [r for r in runs if r["pipeline"] == run["pipeline"] and r["val_photos"]]
    if not scored:
        return "-"
    first = scored[0]
    return f"{first['val_correct']}/{first['val_photos']}"


def comparison_table(runs: list[dict]) -> list[str]:
    lines = ["| input | pipeline | images | faces | images/s | faces/s | p50 ms | p95 ms | "
             "val correct | agent faces/s ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for input_kind in ("video", "photos"):
        agent = slowest(runs, "agent", input_kind)
        for run in (r for r in runs if r["input"] == input_kind):
            ratio = ("-" if agent is None or run["pipeline"] == "agent"
                     else f"{agent['faces_per_s'] / run['faces_per_s']:.1f}x")
            lines.append(
                f"| {input_kind} | {run['pipeline']} | {run['images']} | {run['faces']} | "
                f"{run['images_per_s']:.2f} | {run['faces_per_s']:.2f} | {run['p50_ms']:.0f} | "
                f"{run['p95_ms']:.0f} | {accuracy_cell(run, runs)} | {ratio} |")
    return lines


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text, so the file stays small
    import matplotlib.pyplot as plt

    pipelines = ["agent", "diy", "facenet-pytorch"]
    inputs = ["video", "photos"]
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, input_kind in enumerate(inputs):
        values = []
        for name in pipelines:
            run = slowest(runs, name, input_kind)
            values.append(run["faces_per_s"] if run else 0.0)
        positions = [i + (offset - 0.5) * width for i in range(len(pipelines))]
        bars = axes.bar(positions, values, width, label=f"{input_kind}")
        axes.bar_label(bars, fmt="%.1f", fontsize="small")
    axes.set_xticks(range(len(pipelines)), pipelines)
    axes.set_ylabel("faces per second (higher is better)")
    axes.set_title(title)
    axes.legend(title="input")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(out: Path) -> None:
    runs = load_runs(out)
    lines = ["# Pipelines side by side", "", f"Machine: {runs[0]['machine']}", ""]
    lines += comparison_table(runs)
    notes = sorted({note for run in runs for note in run.get("notes", [])})
    lines += [""] + [f"- {note}" for note in notes]
    bench_path = out / "pipeline.json"
    if bench_path.exists():
        bench = json.loads(bench_path.read_text(encoding="utf-8"))
        lines += ["", "## facenet-agent bench pipeline", "",
                  (out / "pipeline.md").read_text(encoding="utf-8")
                  if (out / "pipeline.md").exists() else json.dumps(bench, indent=2)]
    (out / "pipelines.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(runs, out / "pipelines.svg", "Faces per second, 2 vCPU, one run")
    print(out / "pipelines.md")
    print(out / "pipelines.svg")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/pipelines_report.py OUT")
    main(Path(sys.argv[1]))
