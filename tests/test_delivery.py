"""Event delivery against a real mosquitto: outages, kill -9, ACL refusals and TLS.

The producer runs as a separate process (tests/delivery_producer.py) that stores
numbered events through agent.delivery.Delivery, the same path the run loop
uses, and prints each one once the outbox committed it. A persistent broker
session of an independent subscriber records what arrives.

The outage test takes the broker down for OUTAGE_S seconds, by default the 120
that the acceptance criterion sets; set FACENET_AGENT_OUTAGE_S to shorten it while
developing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt_client
import pytest
import yaml

from agent.config import ConfigError, parse_config
from agent.delivery import Delivery, read_password
from agent.events import identity_topic
from agent.forwarder import Forwarder
from agent.mqtt import MqttPublisher
from agent.outbox import Outbox
from tests.broker import MosquittoBroker, ReceivedMessage, find_mosquitto
from tests.conftest_mqtt import MOSQUITTO_MISSING
from tests.pki import make_pki

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_ID = "gate-01"
EVENTS = f"facenet/{DEVICE_ID}/events/#"
OUTAGE_S = float(os.environ.get("FACENET_AGENT_OUTAGE_S", "120"))
RATE = 20.0
FAST_RECONNECT = {"reconnect_min_delay_s": 0.05, "reconnect_max_delay_s": 0.5}
TIMEOUT_S = 10.0


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def new_broker(tmp_path: Path, **options: Any) -> MosquittoBroker:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip(MOSQUITTO_MISSING)
    broker = MosquittoBroker(tmp_path / "mosquitto", executable=executable, **options)
    broker.start()
    return broker


def agent_config(tmp_path: Path, port: int, **mqtt: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE_ID,
        "mqtt": {"host": "127.0.0.1", "port": port, **FAST_RECONNECT, **mqtt},
        "outbox": {"path": str(tmp_path / "outbox.db"), "max_inflight": 16},
    }


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Producer:
    """The producer process and what it printed so far."""

    def __init__(self, config: Path, *, rate: float, count: int,
                 drain_timeout_s: float = 30.0) -> None:
        self.stored: dict[int, str] = {}
        self.stats: list[dict[str, int]] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.delivery_producer", str(config), "--rate", str(rate),
             "--count", str(count), "--drain-timeout", str(drain_timeout_s)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            words = line.split()
            with self._changed:
                self.lines.append(line.strip())
                if words and words[0] == "stored":
                    self.stored[int(words[1])] = words[2]
                elif words and words[0] == "stats":
                    self.stats.append({k: int(v) for k, v in
                                       (word.split("=") for word in words[1:])})
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> None:
        with self._changed:
            if not self._changed.wait_for(condition, timeout_s):
                raise AssertionError(f"producer did not get there in {timeout_s} s; "
                                     f"last output {self.lines[-3:]}, stderr "
                                     f"{''.join(self.stderr[-20:])}")

    def finish(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        time.sleep(0.2)  # let the reader threads take the last lines
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT_S)


def first_arrivals(messages: list[ReceivedMessage]) -> list[dict[str, Any]]:
    """Return the events in arrival order, without repeats of an event_id."""
    seen: set[str] = set()
    events = []
    for message in messages:
        event = json.loads(message.payload)
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            events.append(event)
    return events


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Any:
    broker = new_broker(tmp_path, persistence=True)
    try:
        yield broker
    finally:
        broker.close()


def test_outage_every_event_arrives_in_order(tmp_path: Path,
                                             persistent_broker: MosquittoBroker) -> None:
    broker = persistent_broker
    # A persistent session, so events that reach the broker while this subscriber
    # is reconnecting wait for it.
    subscriber = broker.subscriber(EVENTS, client_id="test-backend", clean_session=False)
    before, after = 5.0, 5.0
    count = int(RATE * (before + OUTAGE_S + after))
    producer = Producer(write_config(tmp_path, agent_config(tmp_path, broker.port)),
                        rate=RATE, count=count, drain_timeout_s=60.0)
    try:
        producer.wait_for(lambda: len(producer.stored) >= RATE * before, 30.0)
        broker.stop()
        outage_start = len(producer.stats)
        time.sleep(OUTAGE_S)
        outage_stats = producer.stats[outage_start:]
        broker.start()
        assert producer.finish(timeout_s=after + 90.0) == 0, producer.stderr[-20:]
    finally:
        producer.kill()

    assert producer.lines[-1] == "drained"
    assert len(producer.stored) == count
    messages = subscriber.wait_for(count, timeout=30.0)
    events = first_arrivals(messages)
    assert {e["event_id"] for e in events} == set(producer.stored.values())
    indexes = [e["index"] for e in events]
    assert indexes == sorted(indexes)

    # During the outage the events wait on disk: the client's in-memory queue never
    # contains more than the forwarder's window, and resident memory stays flat.
    assert max(s["pending"] for s in outage_stats) <= 16
    assert max(s["depth"] for s in outage_stats) >= RATE * OUTAGE_S * 0.9
    early = outage_stats[len(outage_stats) // 10]["rss_kb"]
    late = outage_stats[-1]["rss_kb"]
    assert late - early < 8 * 1024, f"RSS grew from {early} to {late} KiB during the outage"
    print(f"outage {OUTAGE_S:.0f} s, {count} events, {len(messages)} messages; producer RSS "
          f"{early} -> {late} KiB; outbox depth at the end of the outage "
          f"{outage_stats[-1]['depth']}")


def test_kill_9_while_publishing_loses_nothing(tmp_path: Path,
                                               persistent_broker: MosquittoBroker) -> None:
    broker = persistent_broker
    subscriber = broker.subscriber(EVENTS, client_id="test-backend", clean_session=False)
    config = write_config(tmp_path, agent_config(tmp_path, broker.port))
    producer = Producer(config, rate=400.0, count=100_000)
    try:
        producer.wait_for(lambda: len(producer.stored) >= 400, 30.0)
        assert wait_until(lambda: len(subscriber.messages) >= 100)
        # Freeze the broker so that events stored from now on cannot be
        # acknowledged: the kill then surely lands while events are in flight,
        # however slow or fast this machine is.
        broker.pause()
        stored_at_pause = len(producer.stored)
        producer.wait_for(lambda: len(producer.stored) >= stored_at_pause + 50, 30.0)
        producer.process.send_signal(signal.SIGKILL)
        producer.finish(timeout_s=TIMEOUT_S)
    finally:
        producer.kill()
    stored = dict(producer.stored)
    received_before_restart = {json.loads(m.payload)["event_id"] for m in subscriber.messages}
    assert len(received_before_restart) < len(stored), "the kill came after everything arrived"
    broker.resume()

    restarted = Producer(config, rate=1.0, count=0)
    try:
        assert restarted.finish(timeout_s=60.0) == 0, restarted.stderr[-20:]
    finally:
        restarted.kill()

    wanted = set(stored.values())
    assert wait_until(
        lambda: wanted <= {json.loads(m.payload)["event_id"] for m in subscriber.messages},
        timeout_s=30.0,
    )
    events = first_arrivals(subscriber.messages)
    indexes = [e["index"] for e in events]
    assert indexes == sorted(indexes)


# Security: TLS, passwords and the ACL


def secure_broker(tmp_path: Path, *, require_certificate: bool = True) -> tuple[
        MosquittoBroker, Any, dict[str, str]]:
    """Start mosquitto with TLS, passwords and an ACL; return it, the PKI and the passwords."""
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto_passwd is None:
        pytest.skip("mosquitto_passwd not found; it comes with the Debian package mosquitto")
    pki = make_pki(tmp_path / "pki")
    passwords = {DEVICE_ID: "device-secret-1", "backend": "backend-secret-2"}
    password_file = tmp_path / "passwords"
    for index, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run([mosquitto_passwd, "-b", *create, str(password_file), user, password],
                       check=True)
    acl = tmp_path / "acl"
    acl.write_text(
        "# Every device writes only below its own topic and reads only the gallery.\n"
        "pattern write facenet/%u/#\n"
        "pattern read facenet/gallery/#\n"
        "user backend\n"
        "topic readwrite facenet/#\n"
    )
    extra = [
        f"cafile {pki.ca_cert}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
        f"require_certificate {'true' if require_certificate else 'false'}",
        "allow_anonymous false", f"password_file {password_file}", f"acl_file {acl}",
    ]
    return new_broker(tmp_path, extra_config=extra), pki, passwords


def secure_config(tmp_path: Path, broker: MosquittoBroker, pki: Any, *,
                  device_id: str = DEVICE_ID, password_file: Path | None = None,
                  tls: bool = True) -> dict[str, Any]:
    config = agent_config(tmp_path, broker.port, username=DEVICE_ID)
    config["device_id"] = device_id
    if password_file is not None:
        config["mqtt"]["password_file"] = str(password_file)
    if tls:
        config["mqtt"]["tls"] = {"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert),
                                 "key_file": str(pki.client_key)}
    return config


def test_tls_acl_device_publishes_own_topic(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker, pki, passwords = secure_broker(tmp_path)
    password_file = tmp_path / "device-password"
    password_file.write_text(passwords[DEVICE_ID] + "\n")
    delivery = None
    try:
        backend = broker.subscriber("facenet/#", username="backend",
                                    password=passwords["backend"], ca_file=pki.ca_cert,
                                    client_cert=(pki.client_cert, pki.client_key))
        config = parse_config(secure_config(tmp_path, broker, pki, password_file=password_file))
        delivery = Delivery(config)
        gallery: list[bytes] = []
        delivery.publisher.subscribe("facenet/gallery/#", lambda m: gallery.append(m.payload))
        delivery.start()
        assert delivery.publisher.wait_connected(TIMEOUT_S)
        assert delivery.submit(identity_topic("facenet", DEVICE_ID),
                               {"event_id": "tls-1", "index": 0})
        assert delivery.wait_until_delivered(TIMEOUT_S)
        backend_message = next(m for m in backend.wait_for(2)
                               if m.topic.endswith("/events/identity"))
        assert json.loads(backend_message.payload)["event_id"] == "tls-1"

        # The device reads the gallery topics.
        broker_publish(broker, pki, "backend", passwords["backend"], "facenet/gallery/v1",
                       b"gallery")
        assert wait_until(lambda: gallery == [b"gallery"])
    finally:
        if delivery is not None:
            delivery.close(timeout_s=1.0)
        broker.close()
    assert passwords[DEVICE_ID] not in caplog.text


def broker_publish(broker: MosquittoBroker, pki: Any, user: str, password: str, topic: str,
                   payload: bytes) -> None:
    """Publish one retained-free QoS 1 message with a plain paho client over TLS."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-pub")
    client.username_pw_set(user, password)
    client.tls_set(ca_certs=str(pki.ca_cert), certfile=str(pki.client_cert),
                   keyfile=str(pki.client_key))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()


def test_acl_refusal_keeps_events_and_logs(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker, pki, passwords = secure_broker(tmp_path)
    password_file = tmp_path / "device-password"
    password_file.write_text(passwords[DEVICE_ID])
    delivery = None
    try:
        # Logged in as gate-01 but configured as gate-02: its topics are someone else's.
        config = parse_config(secure_config(tmp_path, broker, pki, device_id="gate-02",
                                            password_file=password_file))
        delivery = Delivery(config)
        delivery.start()
        assert delivery.publisher.wait_connected(TIMEOUT_S)
        for index in range(3):
            delivery.submit(identity_topic("facenet", "gate-02"),
                            {"event_id": f"denied-{index}", "index": index})

        forwarder = delivery.forwarder
        assert wait_until(lambda: forwarder.refused_count >= 3)
        assert not delivery.wait_until_delivered(0.5)
        assert delivery.outbox.depth == 3
        refusals = [r for r in caplog.records if "broker rejected event" in r.getMessage()]
        assert len(refusals) == 1
        assert refusals[0].levelno == logging.ERROR
        assert "Not authorized" in refusals[0].getMessage()
        assert "ACL" in refusals[0].getMessage()
    finally:
        if delivery is not None:
            delivery.close(timeout_s=0.5)
        broker.close()


def test_wrong_password_stops_retrying(tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker, pki, _ = secure_broker(tmp_path)
    password_file = tmp_path / "device-password"
    password_file.write_text("not-the-password")
    delivery = None
    try:
        config = parse_config(secure_config(tmp_path, broker, pki, password_file=password_file))
        delivery = Delivery(config)
        delivery.start()
        assert wait_until(lambda: delivery is not None
                          and delivery.publisher.refused_reason is not None)
        assert delivery.publisher.refused_reason == "Not authorized"
        time.sleep(1.0)  # several back-off periods of 0.05-0.5 s
        assert broker.log_text().count("not authorised") == 1
    finally:
        if delivery is not None:
            delivery.close(timeout_s=0.5)
        broker.close()
    assert "not-the-password" not in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("Reconnecting stopped" in message for message in errors), errors


def test_plain_connection_to_tls_port_explained(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.mqtt")
    broker, pki, passwords = secure_broker(tmp_path, require_certificate=False)
    password_file = tmp_path / "device-password"
    password_file.write_text(passwords[DEVICE_ID])
    delivery = None
    try:
        config = parse_config(secure_config(tmp_path, broker, pki, password_file=password_file,
                                            tls=False))
        delivery = Delivery(config)
        delivery.start()
        assert not delivery.publisher.wait_connected(1.0)
    finally:
        if delivery is not None:
            delivery.close(timeout_s=0.5)
        broker.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("if the port expects TLS, set mqtt.tls" in w for w in warnings), warnings


def test_password_from_systemd_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("s3cret\n")
    config = parse_config({"device_id": DEVICE_ID, "mqtt": {
        "username": DEVICE_ID, "password_credential": "mqtt-password"}})

    assert read_password(config.mqtt, {"CREDENTIALS_DIRECTORY": str(credentials)}) == "s3cret"
    with pytest.raises(ConfigError, match=r"\$CREDENTIALS_DIRECTORY is not"):
        read_password(config.mqtt, {})
    with pytest.raises(ConfigError, match="cannot read the password") as missing:
        read_password(config.mqtt, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "s3cret" not in str(missing.value)


def test_password_without_username_rejected(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("s3cret")
    config = parse_config({"device_id": DEVICE_ID,
                           "mqtt": {"password_file": str(password_file)}})

    with pytest.raises(ConfigError, match="mqtt.username is empty") as error:
        read_password(config.mqtt)
    assert "s3cret" not in str(error.value)


def test_client_id_derived_from_device_id() -> None:
    first = parse_config({"device_id": "gate-01"})
    second = parse_config({"device_id": "gate-02"})

    assert first.mqtt_client_id == "facenet-agent-gate-01"
    assert second.mqtt_client_id != first.mqtt_client_id
    assert re.fullmatch(r"facenet-agent-[\w.-]+", second.mqtt_client_id)


def test_unpublishable_event_dead_lettered(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = new_broker(tmp_path)
    delivery = None
    try:
        delivery = Delivery(parse_config(agent_config(tmp_path, broker.port)))
        received: list[bytes] = []
        delivery.publisher.subscribe(EVENTS, lambda message: received.append(message.payload))
        # Stored before start, as an older config with a wildcard prefix left it.
        delivery.submit("site/#/events", {"event_id": "poison", "index": -1})
        topic = identity_topic("facenet", DEVICE_ID)
        for index in range(3):
            delivery.submit(topic, {"event_id": f"good-{index}", "index": index})
        delivery.start()

        assert delivery.wait_until_delivered(TIMEOUT_S)
        assert wait_until(lambda: len(received) == 3)
        assert [json.loads(payload)["event_id"] for payload in received] == \
            ["good-0", "good-1", "good-2"]
        assert delivery.outbox.depth == 0
        assert delivery.outbox.dropped_unpublishable == 1
        assert delivery.snapshot()["events_dropped"] == 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "poison" in errors[0].getMessage()
        assert "wildcard" in errors[0].getMessage()
    finally:
        if delivery is not None:
            delivery.close(timeout_s=0.5)
        broker.close()


# Messages of the MQTT client and the forwarder


def test_connect_failure_names_errno_and_no_will(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    broker = new_broker(tmp_path)
    broker.stop()  # the port is now closed
    publisher = MqttPublisher("127.0.0.1", broker.port, "test-closed-port",
                              status_topic="facenet/gate-01/status", **FAST_RECONNECT)
    try:
        publisher.start()
        assert wait_until(lambda: any("connection attempt" in r.getMessage()
                                      for r in caplog.records))
    finally:
        publisher.stop(timeout_s=0.2)

    messages = [r.getMessage() for r in caplog.records]
    failures = [m for m in messages if "connection attempt 1" in m]
    assert failures
    assert "Connection refused" in failures[0]
    assert not any("last will" in m for m in messages)
    assert any("without ever connecting" in m for m in messages)


class _RefusingPublisher:
    """Acknowledges at once; refuses every event on `denied_topic`."""

    client_id = "test-refusals"
    connection_count = 1

    def __init__(self, denied_topic: str) -> None:
        self.denied_topic = denied_topic
        self.mid = 0

    def is_connected(self) -> bool:
        return True

    def publish(self, topic: str, payload: bytes, on_acked: Any = None) -> Any:
        self.mid += 1
        info = mqtt_client.MQTTMessageInfo(self.mid)
        info.rc = mqtt_client.MQTT_ERR_SUCCESS
        if on_acked is not None:
            on_acked("Not authorized" if topic == self.denied_topic else None)
        return info


def test_refusal_count_grows_despite_other_deliveries(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.forwarder")
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = _RefusingPublisher("denied/topic")
    outbox.put("denied-0", "denied/topic", b"{}")
    outbox.put("allowed-0", "allowed/topic", b"{}")
    forwarder = Forwarder(outbox, publisher, retry_after_s=0.05)  # type: ignore[arg-type]
    forwarder.start()
    try:
        assert wait_until(lambda: forwarder.refused_count >= 3)
    finally:
        forwarder.stop(timeout_s=0.5)
        outbox.close()

    refusals = [r for r in caplog.records if "broker rejected event" in r.getMessage()]
    assert [r.levelno for r in refusals[:1]] == [logging.ERROR]
    assert all(r.levelno == logging.DEBUG for r in refusals[1:])
    assert "refusal 2 in a row" in refusals[1].getMessage()
    assert "denied/topic" in refusals[0].getMessage()


def test_forwarder_stop_before_start(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    forwarder = Forwarder(outbox, _RefusingPublisher("none"))  # type: ignore[arg-type]

    forwarder.stop(timeout_s=0.1)  # must not raise "cannot join thread"

    outbox.close()


def test_hung_broker_gets_no_tls_hint(tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    broker = new_broker(tmp_path)
    broker.pause()  # accepts TCP, answers nothing
    publisher = MqttPublisher("127.0.0.1", broker.port, "test-hung-broker",
                              status_topic="facenet/gate-01/status", keepalive=1,
                              **FAST_RECONNECT)
    try:
        publisher.start()
        assert wait_until(lambda: any("connection attempt" in r.getMessage()
                                      for r in caplog.records))
    finally:
        publisher.stop(timeout_s=0.2)
        broker.resume()
        broker.close()

    failures = [r.getMessage() for r in caplog.records if "connection attempt" in r.getMessage()]
    assert "no CONNACK within the keep-alive time" in failures[0]
    assert "mqtt.tls" not in failures[0]
