"""`facenet-agent wait-online` against a real mosquitto on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from tests.broker import MosquittoBroker, find_mosquitto

DEVICE_ID = "gate-07"
STATUS_TOPIC = f"facenet/{DEVICE_ID}/status"


def write_config(path: Path, port: int, **mqtt_settings: Any) -> Path:
    config = {
        "device_id": DEVICE_ID,
        "source": {"uri": "0"},
        "mqtt": {"host": "127.0.0.1", "port": port, **mqtt_settings},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def wait_online(config: Path, *extra: str,
                timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "wait-online", "--config", str(config),
         "--timeout", str(timeout), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )


def publish_retained(broker: MosquittoBroker, payload: bytes, **credentials: str) -> None:
    """Publish `payload` as the retained status with a plain paho client, and wait for PUBACK."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-status-writer")
    if credentials:
        client.username_pw_set(credentials["username"], credentials["password"])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(STATUS_TOPIC, payload, qos=1, retain=True)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def password_broker(tmp_path: Path) -> Any:
    """A broker that accepts only the user "agent" with the password "secret"."""
    executable = find_mosquitto()
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if executable is None or mosquitto_passwd is None:
        pytest.skip("mosquitto or mosquitto_passwd not found; install the Debian package "
                    "mosquitto")
    password_file = tmp_path / "passwords"
    subprocess.run([mosquitto_passwd, "-b", "-c", str(password_file), "agent", "secret"],
                   check=True)
    broker = MosquittoBroker(
        tmp_path / "mosquitto", executable=executable,
        extra_config=[f"password_file {password_file}", "allow_anonymous false"],
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_retained_online_passes(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    publish_retained(mqtt_broker, json.dumps({"state": "online"}).encode())
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port)

    result = wait_online(config)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{DEVICE_ID}: {DEVICE_ID} reports online on {STATUS_TOPIC}"


def test_online_arriving_later_passes(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    publish_retained(mqtt_broker, json.dumps({"state": "offline"}).encode())
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port)
    subscriber = mqtt_broker.subscriber(STATUS_TOPIC)
    later = threading.Timer(
        1.5, publish_retained, (mqtt_broker, json.dumps({"state": "online"}).encode()))

    later.start()
    try:
        result = wait_online(config, timeout=20.0)
    finally:
        later.join()

    assert result.returncode == 0, result.stderr
    assert len(subscriber.wait_for(2)) == 2
    assert "reports 'offline'" in result.stderr
    assert "reports 'online'" in result.stderr


def test_offline_status_times_out(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    publish_retained(mqtt_broker, json.dumps({"state": "offline"}).encode())
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port)

    result = wait_online(config, timeout=1.0)

    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"{DEVICE_ID}: timed out after 1 s: {DEVICE_ID} still reports 'offline' on {STATUS_TOPIC}"
    )


def test_missing_status_times_out(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port)

    result = wait_online(config, timeout=1.0)

    assert result.returncode == 1
    assert f"no status message on {STATUS_TOPIC}" in result.stdout


def test_payload_without_state_times_out(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    publish_retained(mqtt_broker, b"online")
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port)

    result = wait_online(config, timeout=1.0)

    assert result.returncode == 1
    assert "still reports '<not JSON>'" in result.stdout


def test_unreachable_broker_times_out(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port)
    mqtt_broker.stop()

    result = wait_online(config, timeout=1.0)

    assert result.returncode == 1
    assert "could not connect to the broker" in result.stdout


def test_password_file_option_used(tmp_path: Path, password_broker: MosquittoBroker) -> None:
    publish_retained(password_broker, json.dumps({"state": "online"}).encode(),
                     username="agent", password="secret")
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("secret\n")
    # The service would read this credential; outside it the option must stand in.
    config = write_config(tmp_path / "agent.yaml", password_broker.port, username="agent",
                          password_credential="mqtt-password")

    result = wait_online(config, "--password-file", str(password_file))

    assert result.returncode == 0, result.stderr
    assert "reports online" in result.stdout


def test_wrong_password_fails_fast(tmp_path: Path, password_broker: MosquittoBroker) -> None:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("wrong\n")
    config = write_config(tmp_path / "agent.yaml", password_broker.port, username="agent",
                          password_file=str(password_file))

    result = wait_online(config, timeout=30.0)

    assert result.returncode == 1
    assert "the broker rejected the connection: Not authorized" in result.stdout
    assert password_broker.log_text().count("not authorised") == 1
    assert "wrong" not in result.stdout + result.stderr


def test_credential_outside_service_rejected(tmp_path: Path,
                                             mqtt_broker: MosquittoBroker) -> None:
    config = write_config(tmp_path / "agent.yaml", mqtt_broker.port, username="agent",
                          password_credential="mqtt-password")

    result = subprocess.run(
        [sys.executable, "-m", "agent", "wait-online", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"},
    )

    assert result.returncode == 2
    assert "CREDENTIALS_DIRECTORY is not set" in result.stderr
    assert "--password-file" in result.stderr


@pytest.mark.parametrize(("acl_lines", "online"), [
    (["pattern write facenet/%u/#", "pattern read facenet/gallery/#"], False),
    (["pattern write facenet/%u/#", "pattern read facenet/gallery/#",
      "pattern read facenet/%u/status"], True),
])
def test_broker_acl_must_allow_status(tmp_path: Path, acl_lines: list[str],
                                      online: bool) -> None:
    executable = find_mosquitto()
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if executable is None or mosquitto_passwd is None:
        pytest.skip("mosquitto or mosquitto_passwd not found; install the Debian package "
                    "mosquitto")
    passwords = tmp_path / "passwords"
    for user in (DEVICE_ID, "admin"):
        subprocess.run([mosquitto_passwd, "-b", *(["-c"] if user == DEVICE_ID else []),
                        str(passwords), user, "secret"], check=True)
    acl = tmp_path / "acl"
    acl.write_text("\n".join(["user admin", "topic readwrite #", "", *acl_lines]) + "\n")
    broker = MosquittoBroker(tmp_path / "mosquitto", executable=executable,
                             extra_config=[f"password_file {passwords}", f"acl_file {acl}",
                                           "allow_anonymous false"])
    broker.start()
    try:
        publish_retained(broker, json.dumps({"state": "online"}).encode(),
                         username="admin", password="secret")
        password_file = tmp_path / "mqtt-password"
        password_file.write_text("secret")
        config = write_config(tmp_path / "agent.yaml", broker.port, username=DEVICE_ID,
                              password_file=str(password_file))

        result = wait_online(config, timeout=2.0)
    finally:
        broker.close()

    assert (result.returncode == 0) is online, result.stdout + result.stderr
    if not online:
        assert "may this user read that topic under the broker's ACL?" in result.stdout
