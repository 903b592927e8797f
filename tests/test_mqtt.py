"""MqttPublisher against a real mosquitto on 127.0.0.1.

Each test gets its own broker from the `mqtt_broker` fixture (tests/conftest_mqtt.py)
and checks what arrives with an independent paho subscriber. Reconnect delays are
0.05-0.2 s, so the file runs in a few seconds.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.config import TlsConfig
from agent.events import identity_topic, status_topic
from agent.mqtt import OFFLINE_PAYLOAD, ONLINE_PAYLOAD, MqttPublisher
from tests.broker import MosquittoBroker, find_mosquitto
from tests.conftest_mqtt import MOSQUITTO_MISSING

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "facenet-test"
DEVICE_ID = "gate-01"
EVENTS_TOPIC = identity_topic(PREFIX, DEVICE_ID)
STATUS_TOPIC = status_topic(PREFIX, DEVICE_ID)
COMMAND_TOPIC = f"{PREFIX}/{DEVICE_ID}/commands"
FAST_RECONNECT = {"reconnect_min_delay_s": 0.05, "reconnect_max_delay_s": 0.2}
TIMEOUT_S = 5.0

PublisherFactory = Callable[..., MqttPublisher]


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def broker_with(tmp_path: Path, **options: Any) -> MosquittoBroker:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip(MOSQUITTO_MISSING)
    return MosquittoBroker(tmp_path / "custom-mosquitto", executable=executable, **options)


@pytest.fixture
def make_publisher() -> Iterator[PublisherFactory]:
    """Build started publishers for a broker; teardown stops every one of them."""
    publishers: list[MqttPublisher] = []

    def make(broker: MosquittoBroker, *, start: bool = True, **options: Any) -> MqttPublisher:
        settings: dict[str, Any] = {"status_topic": STATUS_TOPIC, **FAST_RECONNECT}
        settings.update(options)
        client_id = settings.pop("client_id", f"test-agent-{uuid.uuid4().hex[:8]}")
        publisher = MqttPublisher(broker.host, broker.port, client_id, **settings)
        publishers.append(publisher)
        if start:
            publisher.start()
        return publisher

    yield make
    for publisher in publishers:
        publisher.stop(timeout_s=0.5)


def test_events_arrive_qos1_not_retained(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    subscriber = mqtt_broker.subscriber(EVENTS_TOPIC)
    publisher = make_publisher(mqtt_broker)
    assert publisher.wait_connected(TIMEOUT_S)

    payloads = [f'{{"frame_index":{i}}}'.encode() for i in range(3)]
    for payload in payloads:
        publisher.publish(EVENTS_TOPIC, payload)

    messages = subscriber.wait_for(3)
    assert [m.payload for m in messages] == payloads
    assert {m.topic for m in messages} == {EVENTS_TOPIC}
    assert {m.qos for m in messages} == {1}
    assert {m.retain for m in messages} == {False}


def test_event_not_retained_for_late_subscriber(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker)
    assert publisher.wait_connected(TIMEOUT_S)
    publisher.publish(EVENTS_TOPIC, b"early event")
    assert publisher.wait_for_delivery(TIMEOUT_S)

    late = mqtt_broker.subscriber(EVENTS_TOPIC)
    publisher.publish(EVENTS_TOPIC, b"later event")

    assert [m.payload for m in late.wait_for(1)] == [b"later event"]


def test_status_online_after_start_offline_after_stop(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker)
    assert publisher.wait_connected(TIMEOUT_S)
    assert publisher.wait_for_delivery(TIMEOUT_S)

    online = mqtt_broker.subscriber(STATUS_TOPIC).wait_for(1)
    assert online[0].payload == ONLINE_PAYLOAD
    assert online[0].retain

    publisher.stop(timeout_s=TIMEOUT_S)
    assert not publisher.is_connected()

    offline = mqtt_broker.subscriber(STATUS_TOPIC).wait_for(1)
    assert offline[0].payload == OFFLINE_PAYLOAD
    assert offline[0].retain


def test_status_payloads_are_json() -> None:
    assert ONLINE_PAYLOAD == b'{"state": "online"}'
    assert OFFLINE_PAYLOAD == b'{"state": "offline"}'


def test_last_will_when_process_killed(mqtt_broker: MosquittoBroker) -> None:
    # A separate process that dies by SIGKILL never sends DISCONNECT; the kernel
    # closes its socket, as after a crash of the agent.
    script = (
        "import sys, time\n"
        "from agent.mqtt import MqttPublisher\n"
        "publisher = MqttPublisher(sys.argv[1], int(sys.argv[2]), 'test-agent-killed',\n"
        "                          status_topic=sys.argv[3])\n"
        "publisher.start()\n"
        "ready = publisher.wait_connected(5) and publisher.wait_for_delivery(5)\n"
        "print('ready' if ready else 'not connected', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, mqtt_broker.host, str(mqtt_broker.port), STATUS_TOPIC],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == b"ready"
        subscriber = mqtt_broker.subscriber(STATUS_TOPIC)
        assert subscriber.wait_for(1)[0].payload == ONLINE_PAYLOAD

        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT_S)

        will = subscriber.wait_for(2)[1]
        assert will.payload == OFFLINE_PAYLOAD
        assert will.qos == 1
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT_S)

    retained = mqtt_broker.subscriber(STATUS_TOPIC).wait_for(1)[0]
    assert retained.payload == OFFLINE_PAYLOAD
    assert retained.retain


def test_last_will_after_keepalive_timeout(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker, keepalive=1)
    assert publisher.wait_connected(TIMEOUT_S)
    assert publisher.wait_for_delivery(TIMEOUT_S)
    subscriber = mqtt_broker.subscriber(STATUS_TOPIC)
    assert subscriber.wait_for(1)[0].payload == ONLINE_PAYLOAD

    # Stopping paho's network thread leaves the TCP connection open but silent, as
    # when the network drops without a FIN. The broker gives up after 1.5 keepalives,
    # but mosquitto 2.0.11 checks keepalives only every few seconds: about 5 s here.
    publisher._client.loop_stop()

    will = subscriber.wait_for(2, timeout=15.0)[1]
    assert will.payload == OFFLINE_PAYLOAD
    assert "exceeded timeout" in mqtt_broker.log_text()


def test_queued_messages_delivered_after_outage(
    tmp_path: Path, make_publisher: PublisherFactory
) -> None:
    # The broker keeps the subscriber's session across its restart, so the check
    # does not depend on which client reconnects first.
    broker = broker_with(tmp_path, persistence=True)
    broker.start()
    try:
        subscriber = broker.subscriber(EVENTS_TOPIC, client_id="test-backend", clean_session=False)
        publisher = make_publisher(broker)
        assert publisher.wait_connected(TIMEOUT_S)

        broker.stop()
        assert wait_until(lambda: not publisher.is_connected())
        payloads = [f"queued-{i}".encode() for i in range(5)]
        infos = [publisher.publish(EVENTS_TOPIC, payload) for payload in payloads]
        assert {info.rc for info in infos} == {mqtt.MQTT_ERR_NO_CONN}
        assert not publisher.wait_for_delivery(0.2)

        broker.start()
        assert publisher.wait_for_delivery(TIMEOUT_S)
        assert publisher.pending_count == 0
        messages = subscriber.wait_for(5)
        assert [m.payload for m in messages] == payloads
        assert {m.qos for m in messages} == {1}
    finally:
        broker.close()


def test_unreachable_broker_at_start_not_fatal(
    mqtt_broker: MosquittoBroker,
    make_publisher: PublisherFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    mqtt_broker.stop()
    publisher = make_publisher(mqtt_broker)
    assert not publisher.wait_connected(0.5)

    mqtt_broker.start()
    assert publisher.wait_connected(TIMEOUT_S)

    failures = [r for r in caplog.records if "connection attempt" in r.getMessage()]
    assert [r.levelno for r in failures[:1]] == [logging.WARNING]
    assert len(failures) >= 2
    assert {r.levelno for r in failures[1:]} == {logging.DEBUG}


def test_wait_for_delivery_needs_puback(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker)
    assert publisher.wait_connected(TIMEOUT_S)
    assert publisher.wait_for_delivery(TIMEOUT_S)

    # A stopped broker process still accepts bytes into its socket buffer but sends
    # no PUBACK.
    mqtt_broker.pause()
    try:
        info = publisher.publish(EVENTS_TOPIC, b"waits for puback")
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        assert not publisher.wait_for_delivery(0.3)
        assert publisher.pending_count == 1
    finally:
        mqtt_broker.resume()

    assert publisher.wait_for_delivery(TIMEOUT_S)
    assert publisher.pending_count == 0


def test_wait_for_delivery_with_nothing_published(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker, start=False)

    assert publisher.wait_for_delivery(0.0)


def test_raising_callback_keeps_network_thread(
    mqtt_broker: MosquittoBroker,
    make_publisher: PublisherFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[bytes] = []

    def handle(message: mqtt.MQTTMessage) -> None:
        received.append(bytes(message.payload))
        if message.payload == b"bad command":
            raise RuntimeError("handler failed on purpose")

    publisher = make_publisher(mqtt_broker)
    publisher.subscribe(COMMAND_TOPIC, handle)
    assert publisher.wait_connected(TIMEOUT_S)

    publisher.publish(COMMAND_TOPIC, b"bad command")
    publisher.publish(COMMAND_TOPIC, b"good command")

    assert wait_until(lambda: len(received) == 2), received
    assert received == [b"bad command", b"good command"]
    assert publisher.is_connected()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert COMMAND_TOPIC in errors[0].getMessage()
    assert "handler failed on purpose" in caplog.text


def test_subscriptions_restored_after_restart(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    received: list[bytes] = []
    publisher = make_publisher(mqtt_broker)
    publisher.subscribe(COMMAND_TOPIC, lambda message: received.append(bytes(message.payload)))
    assert publisher.wait_connected(TIMEOUT_S)

    # Without persistence the restarted broker has no sessions, so only the
    # subscribe in on_connect can bring the subscription back.
    mqtt_broker.stop()
    assert wait_until(lambda: not publisher.is_connected())
    mqtt_broker.start()
    assert publisher.wait_connected(TIMEOUT_S)
    publisher.publish(COMMAND_TOPIC, b"after restart")

    assert wait_until(lambda: received == [b"after restart"]), received


def test_subscribe_before_start(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    received: list[bytes] = []
    publisher = make_publisher(mqtt_broker, start=False)
    publisher.subscribe(
        f"{PREFIX}/+/commands", lambda message: received.append(bytes(message.payload))
    )
    publisher.start()
    assert publisher.wait_connected(TIMEOUT_S)

    publisher.publish(COMMAND_TOPIC, b"reload")

    assert wait_until(lambda: received == [b"reload"]), received


@pytest.mark.parametrize("topic", ["", "a/#/b", "a/b#", "a/b+/c", "a/\0"])
def test_subscribe_rejects_invalid_filter(topic: str) -> None:
    publisher = MqttPublisher("127.0.0.1", 1883, "test-agent", status_topic=STATUS_TOPIC)

    with pytest.raises(ValueError, match="invalid topic filter"):
        publisher.subscribe(topic, lambda message: None)


def test_full_queue_drops_events_keeps_status(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker, max_queued_messages=3)
    assert publisher.wait_connected(TIMEOUT_S)
    assert publisher.wait_for_delivery(TIMEOUT_S)
    mqtt_broker.stop()
    assert wait_until(lambda: not publisher.is_connected())

    infos = [publisher.publish(EVENTS_TOPIC, f"event-{i}".encode()) for i in range(5)]

    assert [info.rc for info in infos] == [mqtt.MQTT_ERR_NO_CONN] * 3 + [
        mqtt.MQTT_ERR_QUEUE_SIZE
    ] * 2
    assert publisher.pending_count == 3

    # The online status published at reconnect must not be dropped with the events.
    mqtt_broker.start()
    assert publisher.wait_connected(TIMEOUT_S)
    assert publisher.wait_for_delivery(TIMEOUT_S)
    status = mqtt_broker.subscriber(STATUS_TOPIC).wait_for(1)[0]
    assert status.payload == ONLINE_PAYLOAD


def test_stop_bounded_with_unresponsive_broker(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker)
    assert publisher.wait_connected(TIMEOUT_S)
    mqtt_broker.pause()
    try:
        publisher.publish(EVENTS_TOPIC, b"never acknowledged")
        started = time.monotonic()
        publisher.stop(timeout_s=0.3)
        elapsed = time.monotonic() - started
    finally:
        mqtt_broker.resume()

    assert elapsed < 1.0
    assert not publisher.is_connected()


def test_stop_bounded_with_broker_down(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker, reconnect_min_delay_s=5.0, reconnect_max_delay_s=5.0)
    assert publisher.wait_connected(TIMEOUT_S)
    mqtt_broker.stop()
    assert wait_until(lambda: not publisher.is_connected())
    publisher.publish(EVENTS_TOPIC, b"queued at stop")

    started = time.monotonic()
    publisher.stop(timeout_s=0.3)

    # 0.3 s of waiting for PUBACKs plus up to 1 s until paho's reconnect wait
    # notices the stop.
    assert time.monotonic() - started < 1.5


def test_publish_after_stop_raises(
    mqtt_broker: MosquittoBroker, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher(mqtt_broker)
    assert publisher.wait_connected(TIMEOUT_S)
    publisher.stop(timeout_s=TIMEOUT_S)

    with pytest.raises(RuntimeError, match="is stopped"):
        publisher.publish(EVENTS_TOPIC, b"too late")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client_id": ""}, "client_id must not be empty"),
        ({"keepalive": 0}, "keepalive must be positive"),
        ({"max_queued_messages": 0}, "max_queued_messages must be at least 1"),
        ({"reconnect_min_delay_s": 2.0, "reconnect_max_delay_s": 1.0}, "0 < min <= max"),
        ({"password": "secret"}, "username is empty"),
        ({"tls": TlsConfig(key_file=Path("client.key"))}, "without tls.cert_file"),
    ],
)
def test_invalid_settings_rejected(options: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"client_id": "test-agent", "status_topic": STATUS_TOPIC}
    settings.update(options)

    with pytest.raises(ValueError, match=message):
        MqttPublisher("127.0.0.1", 1883, **settings)


def test_bad_password_stops_retrying(tmp_path: Path, make_publisher: PublisherFactory) -> None:
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto_passwd is None:
        pytest.skip("mosquitto_passwd not found; it comes with the Debian package mosquitto")
    password_file = tmp_path / "passwords"
    subprocess.run(
        [mosquitto_passwd, "-b", "-c", str(password_file), "agent", "secret"], check=True
    )
    broker = broker_with(
        tmp_path, extra_config=[f"password_file {password_file}", "allow_anonymous false"]
    )
    broker.start()
    try:
        accepted = make_publisher(broker, username="agent", password="secret")
        assert accepted.wait_connected(TIMEOUT_S)

        rejected = make_publisher(broker, username="agent", password="wrong")
        assert wait_until(lambda: rejected.refused_reason is not None)
        assert rejected.refused_reason == "Not authorized"
        assert not rejected.is_connected()

        # With 0.05-0.2 s back-off, a client that kept retrying would be rejected
        # several more times in this wait.
        time.sleep(0.6)
        assert broker.log_text().count("not authorised") == 1
        assert not rejected.is_connected()
    finally:
        broker.close()


def test_tls_connection_checks_ca(tmp_path: Path, make_publisher: PublisherFactory) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; install the Debian package openssl")
    ca_cert, server_cert, server_key = _make_certificates(openssl, tmp_path / "pki")
    other_ca_cert, _, _ = _make_certificates(openssl, tmp_path / "other-pki")
    broker = broker_with(
        tmp_path,
        extra_config=[f"cafile {ca_cert}", f"certfile {server_cert}", f"keyfile {server_key}"],
    )
    broker.start()
    try:
        trusted = make_publisher(broker, tls=TlsConfig(ca_file=ca_cert))
        assert trusted.wait_connected(TIMEOUT_S)
        trusted.publish(EVENTS_TOPIC, b"over tls")
        assert trusted.wait_for_delivery(TIMEOUT_S)

        untrusted = make_publisher(broker, tls=TlsConfig(ca_file=other_ca_cert))
        assert not untrusted.wait_connected(0.5)
        assert untrusted.refused_reason is None
    finally:
        broker.close()


def _make_certificates(openssl: str, folder: Path) -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate for 127.0.0.1 signed by it; return their paths."""
    folder.mkdir()
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    server_key, server_cert = folder / "server.key", folder / "server.crt"
    server_csr = folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    new_ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", *new_ec_key, "-keyout", str(ca_key), "-out", str(ca_cert),
        "-days", "1", "-subj", "/CN=facenet-test-ca")
    run("req", *new_ec_key, "-keyout", str(server_key), "-out", str(server_csr),
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(server_csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(server_cert), "-days", "1", "-extfile", str(extensions))
    return ca_cert, server_cert, server_key
