"""`facenet-agent server`: operator mistakes end in one stderr line that names the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    assert main(["server", "keygen", "--out", str(tmp_path / "keys")]) == 0
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({
        "server_id": "central-1",
        "store": {"path": str(tmp_path / "server.db")},
        "signing": {"private_key_file": str(tmp_path / "keys" / "server.key")},
        "mqtt": {"host": "127.0.0.1", "port": 1},
    }))
    return path


def with_settings(config: Path, **sections: dict) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw.update(sections)
    path = config.with_name("edited.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def run_server(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["server", *args])
    return code, capsys.readouterr().err


def assert_one_line(stderr: str, *expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("facenet-agent server")]
    assert len(lines) == 1, stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in stderr


def test_unknown_group_named(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = run_server(capsys, "publish", "--config", str(config), "--group", "nobody")

    assert code == 2
    assert_one_line(stderr, "group nobody not found", "enrol or import")


def test_invalid_group_name(config: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = run_server(capsys, "enroll", str(tmp_path), "--config", str(config),
                              "--group", "a/b")

    assert code == 2
    assert_one_line(stderr, "--group", "'a/b'", "without /")


def test_missing_enrol_folder(config: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"

    code, stderr = run_server(capsys, "enroll", str(missing), "--config", str(config),
                              "--group", "lobby")

    assert code == 2
    assert_one_line(stderr, str(missing), "one sub-folder of photos per person")


def test_missing_signing_key(config: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.key"
    edited = with_settings(config, signing={"private_key_file": str(missing)})

    code, stderr = run_server(capsys, "publish", "--config", str(edited), "--group", "lobby")

    assert code == 2
    assert_one_line(stderr, str(missing), "No such file", "server keygen")


def test_existing_key_kept(config: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "keys" / "server.key"
    before = key.read_bytes()

    code, stderr = run_server(capsys, "keygen", "--out", str(tmp_path / "keys"))

    assert code == 2
    assert_one_line(stderr, str(key), "move it away")
    assert key.read_bytes() == before


def test_unwritable_store_path(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited = with_settings(config, store={"path": "/proc/no-such-dir/server.db"})

    code, stderr = run_server(capsys, "remove", "someone", "--config", str(edited),
                              "--group", "lobby")

    assert code == 2
    assert_one_line(stderr, "/proc/no-such-dir/server.db", "store.path")


def test_import_bad_line_named(config: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    lines = tmp_path / "people.jsonl"
    lines.write_text('{"id": "a", "embeddings": [[1, 0]]}\n{"id": "b", "embeddings": [[NaN, 0]]}\n')

    code, stderr = run_server(capsys, "import", str(lines), "--config", str(config), "--group",
                              "lobby", "--model-id", "m", "--embedding-size", "2")

    assert code == 2
    assert_one_line(stderr, f"{lines}:2", "NaN")


def test_import_model_mismatch(config: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    lines = tmp_path / "people.jsonl"
    lines.write_text('{"id": "a", "embeddings": [[1, 0]]}\n')
    common = ["--config", str(config), "--group", "lobby", "--embedding-size", "2"]
    assert run_server(capsys, "import", str(lines), "--model-id", "m1", *common)[0] == 0

    code, stderr = run_server(capsys, "import", str(lines), "--model-id", "m2", *common)

    assert code == 2
    assert_one_line(stderr, "uses model m1", "not m2", "use another group")


def test_broker_unreachable_named(config: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lines = tmp_path / "people.jsonl"
    lines.write_text('{"id": "a", "embeddings": [[1, 0]]}\n')
    common = ["--config", str(config), "--group", "lobby"]
    assert run_server(capsys, "import", str(lines), "--model-id", "m", "--embedding-size", "2",
                      *common)[0] == 0
    monkeypatch.setattr("agent.server.cli.BROKER_WAIT_S", 0.5)

    code, stderr = run_server(capsys, "publish", *common)

    assert code == 2
    assert_one_line(stderr, "127.0.0.1:1", "mqtt.host")
