#!/usr/bin/env bash
# Sweep the embedder over every installed runtime, precision and batch size
# on this machine, with the tuning sweep and an exhaustive sweep in one run,
# and write bench.json, bench.md and bench.png to OUT (default
# benchmarks/results/runtimes). Record the numbers, with the machine, in
# docs/benchmarks.md.
#
# Usage: benchmarks/runtimes.sh [OUT] [SECONDS_PER_POINT]
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-benchmarks/results/runtimes}"
SECONDS_PER_POINT="${2:-2}"
PYTHON="${PYTHON:-.venv/bin/python}"
MODELS="${FACENET_AGENT_MODELS:-$PWD/.cache/models}"

# The tuning cache goes to a throw-away folder so the benchmark never reuses it.
CACHE="$(mktemp -d)"
trap 'rm -rf "$CACHE"' EXIT
cat > "$CACHE/bench.yaml" <<YAML
device_id: bench
models: {dir: $MODELS}
runtime: {cache_dir: $CACHE}
YAML

"$PYTHON" -m agent bench --config "$CACHE/bench.yaml" --seconds "$SECONDS_PER_POINT" \
    --out "$OUT"
