"""Config validation: errors name the key, the bad value and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "device_id: gate-01\n"))

    assert config.device_id == "gate-01"
    assert config.mqtt.port == 1883
    assert config.matching.metric == "euclidean"
    assert config.matching.threshold == 1.1
    assert config.mqtt_client_id == "facenet-agent-gate-01"


def test_nested_values_parsed(tmp_path: Path) -> None:
    text = """
device_id: gate-01
source: {uri: 0}
mqtt:
  host: broker.local
  port: 8883
  tls: {ca_file: /etc/ca.pem}
detection: {thresholds: [0.5, 0.6, 0.7]}
"""
    config = load_config(_write(tmp_path, text))

    assert config.source.uri == "0"
    assert config.mqtt.tls is not None
    assert config.mqtt.tls.ca_file == Path("/etc/ca.pem")
    assert config.detection.thresholds == [0.5, 0.6, 0.7]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mqtt": {"prot": 1883}}, "mqtt.prot: unknown key; valid keys here are client_id"),
        ({"mqtt": {"port": "1883x"}}, "mqtt.port: expected an integer, got '1883x'"),
        ({"mqtt": {"port": 70000}}, "mqtt.port: must be at most 65535, got 70000"),
        ({"mqtt": {"port": True}}, "mqtt.port: expected an integer, got True"),
        ({"matching": {"metric": "cosine"}},
         "matching.metric: expected one of euclidean, squared_euclidean, got 'cosine'"),
        ({"matching": {"threshold": float("nan")}},
         "matching.threshold: expected a finite number, got nan"),
        ({"detection": {"thresholds": [0.6, "high", 0.8]}},
         r"detection.thresholds\[1\]: expected a finite number, got 'high'"),
        ({"detection": {"thresholds": [0.6, 0.7]}},
         "detection.thresholds: expected three scores between 0 and 1"),
        ({"runtime": {"batch_size": -1}}, "runtime.batch_size: must be at least 0, got -1"),
        ({"runtime": "fast"}, "runtime: expected a mapping, got 'fast'"),
        ({"mqtt": {"tls": {"cert_file": "/c.pem"}}},
         "mqtt.tls: cert_file and key_file must be set together"),
        ({"models": {"verify_sha256": "yes"}},
         "models.verify_sha256: expected true or false, got 'yes'"),
    ],
)
def test_invalid_value_names_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"device_id": "gate-01", **raw})


def test_missing_device_id_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device_id: missing"):
        load_config(_write(tmp_path, "mqtt: {port: 1883}\n"))


def test_invalid_yaml_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "device_id: [unclosed\n"))


def test_top_level_list_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of settings at the top level"):
        load_config(_write(tmp_path, "- device_id: gate-01\n"))


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"device_id": "gate/01"}, "device_id: expected letters, digits"),
        ({"device_id": "gate+01"}, "device_id: expected letters, digits"),
        ({"mqtt": {"password_file": "/etc/pw", "password_credential": "mqtt-password"}},
         "mqtt.password_credential: set either it or mqtt.password_file"),
        ({"mqtt": {"password_credential": "../pw"}}, "mqtt.password_credential: expected a "
                                                     "credential name"),
        ({"events": {"confirm_frames": 6, "confirm_window": 5}},
         "events.confirm_frames: must be at most events.confirm_window"),
        ({"outbox": {"full_policy": "keep"}}, "outbox.full_policy: expected one of"),
        ({"outbox": {"max_events": 0}}, "outbox.max_events: must be at least 1"),
        ({"mqtt": {"protocol": "3"}}, "mqtt.protocol: expected one of 5, 3.1.1"),
    ],
)
def test_delivery_settings_checked(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_delivery_defaults() -> None:
    config = parse_config({"device_id": "gate-01"})

    assert config.events.mode == "appearance"
    assert config.outbox.full_policy == "drop_oldest"
    assert config.outbox.sync == "full"
    assert config.mqtt.protocol == "5"
    assert config.health.prometheus_port == 0
    assert config.health.prometheus_host == "127.0.0.1"
