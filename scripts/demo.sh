#!/usr/bin/env bash
# Demo on the example photos: install, build the models, start a broker on a
# free loopback port, enrol train/, run the agent over val/ and print every
# event a real subscriber receives. Everything it writes goes under .cache/demo.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export FACENET_AGENT_CACHE="$PWD/.cache/downloads"
DATA="$(.venv/bin/python -c 'from agent.models.fetch import default_cache_dir, example_dataset; print(example_dataset(default_cache_dir()))')"
WORK="$PWD/.cache/demo"
rm -rf "$WORK" && mkdir -p "$WORK"

PORT="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
CONF
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!
trap 'kill "${SUBSCRIBER_PID:-}" "$BROKER_PID" 2>/dev/null || true' EXIT
sleep 1

cat > "$WORK/agent.yaml" <<YAML
device_id: demo-01
models: {dir: $PWD/.cache/models}
gallery: {path: $WORK/gallery.db}
outbox: {path: $WORK/outbox.db}
source: {uri: $DATA/val}
mqtt: {host: 127.0.0.1, port: $PORT}
log_level: WARNING
YAML

echo "== enrolling $DATA/train"
.venv/bin/facenet-agent enroll "$DATA/train" --config "$WORK/agent.yaml"

echo "== running over $DATA/val; events received by a subscriber on port $PORT:"
mosquitto_sub -h 127.0.0.1 -p "$PORT" -q 1 -v -t 'facenet/+/events/#' >"$WORK/events.txt" &
SUBSCRIBER_PID=$!
sleep 0.5
.venv/bin/facenet-agent run --config "$WORK/agent.yaml"
sleep 1
.venv/bin/python - "$WORK/events.txt" <<'PY'
import json
import sys
from pathlib import Path

for line in Path(sys.argv[1]).read_text().splitlines():
    topic, payload = line.split(" ", 1)
    event = json.loads(payload)
    photo = Path(event["source"])
    who = event["identity"]["name"] or "unknown"
    print(f"{photo.parent.name}/{photo.name[:40]:40s} -> {who:15s} distance {event['distance']}")
PY
echo "== full events: $WORK/events.txt"
