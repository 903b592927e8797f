"""A separate process for the delivery tests: numbered events through agent.delivery.Delivery.

Usage: python -m tests.delivery_producer CONFIG --rate EVENTS_PER_S --count N

It prints one line per event as soon as the outbox has committed it,
`stored <index> <event_id>`, and every `--stats-every` events a line
`stats rss_kb=.. depth=.. inflight=.. pending=..`. After the last event it waits
up to `--drain-timeout` seconds for the broker's PUBACKs, prints `drained` or
`not drained`, closes the delivery and exits. SIGTERM ends the production early
and drains the same way. Recognition is left out on purpose: these tests are
about what happens to an event after the run loop stored it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from agent.config import load_config
from agent.delivery import Delivery
from agent.events import identity_topic


def rss_kb() -> int:
    """Return this process's resident set size in KiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--count", type=int, default=0, help="events to produce")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--stats-every", type=int, default=20, help="events between stats")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_config(args.config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    delivery = Delivery(config)
    delivery.start()
    topic = identity_topic(config.mqtt.topic_prefix, config.device_id)
    print("ready", flush=True)

    started = time.monotonic()
    for index in range(args.count):
        if stop.is_set():
            break
        event = {
            "schema_version": 1,
            "event_id": str(uuid.uuid4()),
            "device_id": config.device_id,
            "index": index,
            "capture_time": time.time(),
            # About the size of a real identity event.
            "padding": "x" * 300,
        }
        if delivery.submit(topic, event):
            print(f"stored {index} {event['event_id']}", flush=True)
        else:
            print(f"rejected {index} {event['event_id']}", flush=True)
        if index % args.stats_every == 0:
            print_stats(delivery)
        next_time = started + (index + 1) / args.rate
        stop.wait(max(next_time - time.monotonic(), 0.0))

    print_stats(delivery)
    drained = delivery.wait_until_delivered(args.drain_timeout)
    print("drained" if drained else "not drained", flush=True)
    delivery.close(timeout_s=5.0)
    return 0 if drained else 1


def print_stats(delivery: Delivery) -> None:
    print(
        f"stats rss_kb={rss_kb()} depth={delivery.outbox.depth} "
        f"inflight={delivery.forwarder.inflight_count} "
        f"pending={delivery.publisher.pending_count}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
