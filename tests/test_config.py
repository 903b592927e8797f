"""Config validation: errors name the key, the bad value and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, check_config_files, load_config, parse_config


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

    assert config.events.mode == "auto"
    assert config.outbox.full_policy == "drop_oldest"
    assert config.outbox.sync == "full"
    assert config.mqtt.protocol == "5"
    assert config.health.prometheus_port == 0
    assert config.health.prometheus_host == "127.0.0.1"


@pytest.mark.parametrize("prefix", ["#", "site/#", "a/+/b", "a\0b", "", "/facenet",
                                    "facenet/", "a//b"])
def test_topic_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError, match="mqtt.topic_prefix"):
        parse_config({"device_id": "gate-01", "mqtt": {"topic_prefix": prefix}})


def test_topic_prefix_with_levels_accepted() -> None:
    config = parse_config({"device_id": "gate-01", "mqtt": {"topic_prefix": "site-3/facenet"}})

    assert config.mqtt.topic_prefix == "site-3/facenet"


@pytest.mark.parametrize("host, message", [
    ("", "mqtt.host: missing"),
    ("  ", "mqtt.host: missing"),
    (12, "mqtt.host: expected a string, got 12"),
])
def test_mqtt_host_rejected(host: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"device_id": "gate-01", "mqtt": {"host": host}})


@pytest.mark.parametrize("device_id", ["a/b", "a+b", "a#b", "a\0b"])
def test_device_id_topic_characters_rejected(device_id: str) -> None:
    with pytest.raises(ConfigError, match="device_id"):
        parse_config({"device_id": device_id})


def test_nul_byte_in_path_rejected() -> None:
    with pytest.raises(ConfigError, match="gallery.path: expected a file path without NUL"):
        parse_config({"device_id": "gate-01", "gallery": {"path": "/tmp/a\0b.db"}})


def test_yaml_alias_rejected_quickly(tmp_path: Path) -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, previous in zip("bcdefghi", "abcdefgh", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    text = "device_id: gate-01\nlaughs:\n" + "".join(f"  {line}\n" for line in levels)

    with pytest.raises(ConfigError, match="aliases"):
        load_config(_write(tmp_path, text))


def test_duplicate_key_rejected(tmp_path: Path) -> None:
    text = "device_id: gate-01\nmqtt: {host: a}\nmqtt: {host: b}\n"

    with pytest.raises(ConfigError, match="duplicate key 'mqtt'"):
        load_config(_write(tmp_path, text))


def test_oversized_config_rejected(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: gate-01\n" + "#" * (2 * 1024 * 1024) + "\n")

    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_non_utf8_config_rejected(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"device_id: gate-\xff\xfe\n")

    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_long_bad_value_truncated() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"device_id": "gate-01", "mqtt": {"port": "x" * 100_000}})

    assert "mqtt.port" in str(caught.value)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_missing_tls_file_reported(tmp_path: Path, key: str) -> None:
    tls = {name: str(tmp_path / "present.pem") for name in ("ca_file", "cert_file", "key_file")}
    (tmp_path / "present.pem").write_text("x")
    tls[key] = str(tmp_path / "missing.pem")
    config = parse_config({"device_id": "gate-01", "mqtt": {"tls": tls}})

    with pytest.raises(ConfigError, match=f"mqtt.tls.{key}: cannot read .*missing.pem"):
        check_config_files(config)


def test_missing_password_file_reported(tmp_path: Path) -> None:
    config = parse_config({"device_id": "gate-01",
                           "mqtt": {"username": "u", "password_file": str(tmp_path / "pw")}})

    with pytest.raises(ConfigError, match="mqtt.password_file: cannot read"):
        check_config_files(config)
