#!/usr/bin/env bash
# Run the agent with one inference package at a time, each in its own virtual
# environment: only onnxruntime, only ai-edge-litert (TFLite), only
# tensorflow-cpu. Uses the models that scripts/setup.sh built in .cache/models.
#
# The environments live in .venv-only-<runtime> and are reused between runs;
# pip's wheel cache makes a fresh one take about a minute, most of it
# tensorflow-cpu. They install the agent without its build and test extras,
# plus pytest alone, so nothing else drags in a second runtime.
set -euo pipefail
cd "$(dirname "$0")/.."

export FACENET_AGENT_CACHE="${FACENET_AGENT_CACHE:-$PWD/.cache/downloads}"
export FACENET_AGENT_MODELS="${FACENET_AGENT_MODELS:-$PWD/.cache/models}"
PYTHON="${PYTHON:-python3}"

for runtime in onnxruntime tflite tensorflow; do
    venv=".venv-only-$runtime"
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e ".[$runtime]" "pytest>=8"
    echo "== agent with only $runtime installed"
    FACENET_AGENT_ONLY_RUNTIME="$runtime" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_single_runtime.py
done
