#!/usr/bin/env bash
# Run the whole test suite: lint, type check and pytest against real models,
# real photos and a real Mosquitto broker on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export FACENET_AGENT_CACHE="$PWD/.cache/downloads"
export FACENET_AGENT_MODELS="$PWD/.cache/models"

.venv/bin/ruff check agent tests
.venv/bin/mypy agent
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
# The agent with one inference package at a time, each in its own venv.
bash scripts/test-runtimes.sh
