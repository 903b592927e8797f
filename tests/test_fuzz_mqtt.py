"""Fuzz the topics the agent subscribes to: 10,000 random or malformed payloads.

The agent's only subscriptions are the gallery-sync topics of its group (the
signed manifest and the delta chunks). Hypothesis draws 10,000 topic and
payload pairs: raw bytes, arbitrary JSON including NaN and infinity, manifest
envelopes with wrong fields, and byte flips of a correctly signed manifest.
All go to one synced agent over a real Mosquitto. Afterwards the
agent must still be connected, its sync worker alive, its gallery unchanged,
the heap of agent and paho code flat, every manifest payload rejected, and a good delta must apply.
"""

from __future__ import annotations

import json
import logging
import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agent import gallery_sync
from agent.gallery_protocol import chunk_topic, group_topic, manifest_topic

# The fixtures (server, raw, synced and what they use) are imported so pytest
# finds them here; tests receive them by name, hence the F401/F811 waivers.
from tests.test_gallery_sync import (  # noqa: F401
    GROUP,
    PREFIX,
    Agent,
    RawClient,
    Server,
    forge,
    gallery_rows,
    make_agent,
    raw,
    send,
    server,
    synced,
    unit_rows,
    wait_until,
)

PAYLOADS = int(os.environ.get("FUZZ_PAYLOADS", "10000"))
SAMPLE_EVERY = PAYLOADS // 10
# Memory held by the agent and paho may grow this much from the first sample to
# the last. Resident memory is no use here, because Hypothesis itself keeps
# about 8 MiB per 1,000 examples in this process.
MAX_GROWTH_BYTES = 2 * 1024 * 1024

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
ENVELOPES = st.fixed_dictionaries({
    "manifest": st.text(max_size=200) | JSON_VALUES.map(json.dumps),
    "signature": st.text(max_size=100) | st.integers(),
})


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _flip(payload: bytes, positions: list[int]) -> bytes:
    data = bytearray(payload)
    for position in positions:
        data[position % len(data)] ^= 0x41
    return bytes(data)


def payloads(signed_manifest: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=2048),
        JSON_VALUES.map(_json_bytes),
        ENVELOPES.map(_json_bytes),
        st.lists(st.integers(0, 10**6), min_size=1, max_size=4).map(
            lambda positions: _flip(signed_manifest, positions)),
    )


def topics() -> st.SearchStrategy[str]:
    base = group_topic(PREFIX, GROUP)
    return st.one_of(
        st.just(manifest_topic(PREFIX, GROUP)),
        st.builds(lambda v, i: chunk_topic(PREFIX, GROUP, "delta", v, i),
                  st.integers(-5, 2**40), st.integers(-5, 2**40)),
        st.text(alphabet="abc019/-_.", max_size=20).map(lambda tail: f"{base}/delta/{tail}"),
    )


def agent_heap() -> tracemalloc.Snapshot:
    """Return the live allocations made on a line of agent or paho code.

    Only the innermost frame is recorded, which keeps tracing cheap enough for
    10,000 messages; objects built inside the standard library are not counted.
    """
    return tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(True, "*/agent/*"),
        tracemalloc.Filter(True, "*/paho/*"),
    ])


def total_bytes(snapshot: tracemalloc.Snapshot) -> int:
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.mark.slow
def test_agent_survives_fuzzed_sync_topics(  # noqa: F811
        synced: Agent, server: Server, raw: RawClient,  # noqa: F811
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING)
    # A small cap for delta chunks that wait for their manifest, so the buffer is
    # full after the first sample and any later growth is a leak.
    monkeypatch.setattr(gallery_sync, "UNVERIFIED_BYTES", 256 * 1024)
    signed = forge(server.key, version=2, base=1).manifest
    sent = {"total": 0, "manifest": 0}
    memory: list[tracemalloc.Snapshot] = []
    in_flight = []

    # Only the generate phase: no shrinking, because a failure is an agent that
    # died or leaked, which the assertions after the run report.
    @settings(max_examples=PAYLOADS, deadline=None, database=None,
              phases=[Phase.generate],
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(topic=topics(), payload=payloads(signed))
    def publish_one(topic: str, payload: bytes) -> None:
        in_flight.append(raw.client.publish(topic, payload, qos=1))
        sent["total"] += 1
        sent["manifest"] += topic == manifest_topic(PREFIX, GROUP)
        if sent["total"] % SAMPLE_EVERY == 0:
            for info in in_flight:
                info.wait_for_publish(30.0)
            in_flight.clear()
            assert synced.sync.wait_idle(60.0)
            memory.append(agent_heap())

    tracemalloc.start(1)
    try:
        publish_one()
    finally:
        tracemalloc.stop()

    assert sent["total"] >= PAYLOADS * 0.95, sent
    assert synced.client.is_connected()
    assert synced.sync._thread is not None and synced.sync._thread.is_alive()
    assert synced.gallery.version == 1
    assert gallery_rows(synced.gallery.path) == (1, {"forged-1": 2})
    rejected = sum(synced.sync.rejected.counts.values())
    assert rejected >= sent["manifest"], (synced.sync.rejected.counts, sent)
    assert "gallery sync rejected" in caplog.text
    growth = total_bytes(memory[-1]) - total_bytes(memory[0])
    top = "\n".join(str(stat) for stat in memory[-1].compare_to(memory[0], "lineno")[:5])
    assert growth < MAX_GROWTH_BYTES, f"agent heap grew {growth} bytes; largest growth:\n{top}"

    good = forge(server.key, version=2, base=1,
                 identities=[("after", "After", "add", unit_rows(1, 42))])
    send(raw, good)
    assert wait_until(lambda: synced.gallery.version == 2)
