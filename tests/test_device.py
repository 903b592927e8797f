"""Device profiles: shipped profiles load, typos are rejected by key, detection picks the board."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.device import (
    SOURCE_PROFILES_DIR,
    MachineFacts,
    detect_profile,
    load_profile,
    load_profiles,
    read_machine_facts,
    resolve_profile,
)

SHIPPED = {"jetson-tx2", "hikey960", "x86_64-generic", "aarch64-generic", "raspberry-pi-4"}


def facts(machine: str, model: str = "", files: tuple[str, ...] = (),
          flags: tuple[str, ...] = ()) -> MachineFacts:
    return MachineFacts(model, frozenset(files), machine, frozenset(flags))


def test_shipped_profiles_load():
    profiles = load_profiles(SOURCE_PROFILES_DIR)
    assert set(profiles) == SHIPPED
    for profile in profiles.values():
        assert profile.runtimes, profile.name
        assert profile.batch_sizes == sorted(profile.batch_sizes), profile.name


@pytest.mark.parametrize(("machine_facts", "expected"), [
    (facts("aarch64", "NVIDIA Jetson TX2 Developer Kit", ("/etc/nv_tegra_release",)),
     "jetson-tx2"),
    (facts("aarch64", "HiKey960"), "hikey960"),
    (facts("aarch64", "Raspberry Pi 4 Model B Rev 1.4"), "raspberry-pi-4"),
    (facts("aarch64", "Some other board"), "aarch64-generic"),
    (facts("x86_64", flags=("avx2",)), "x86_64-generic"),
])
def test_detection_picks_board(machine_facts, expected):
    profiles = load_profiles(SOURCE_PROFILES_DIR)
    assert detect_profile(profiles, machine_facts).name == expected


def test_jetson_needs_tegra_release():
    profiles = load_profiles(SOURCE_PROFILES_DIR)
    found = detect_profile(profiles, facts("aarch64", "NVIDIA Jetson TX2 Developer Kit"))
    assert found.name == "aarch64-generic"


def test_no_match_names_profiles():
    with pytest.raises(ConfigError, match="set device.profile to one of aarch64-generic"):
        detect_profile(load_profiles(SOURCE_PROFILES_DIR), facts("riscv64"))


def test_read_machine_facts_from_root(tmp_path: Path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"HiKey960\0")
    (tmp_path / "proc/cpuinfo").write_text("processor : 0\nFeatures : fp asimd crc32\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("R32")
    found = read_machine_facts(tmp_path, ("/etc/nv_tegra_release", "/etc/absent"))
    assert found.device_tree_model == "HiKey960"
    assert "asimd" in found.cpu_flags
    assert found.existing_files == {"/etc/nv_tegra_release"}


def test_config_overrides_detection():
    assert resolve_profile("hikey960", None).name == "hikey960"
    with pytest.raises(ConfigError, match="unknown profile 'tx2'"):
        resolve_profile("tx2", None)


@pytest.mark.parametrize(("edit", "message"), [
    (("latency_budget_ms: 1000", "latency_budjet_ms: 1000"),
     "latency_budjet_ms: unknown key; valid keys here are"),
    (("  machine: [x86_64, AMD64]", "  machin: [x86_64, AMD64]"),
     "detect.machin: unknown key"),
    (("  - name: tflite", "  - name: tflite\n    delegates: [xnnpack]"),
     r"runtimes\[1\].delegates: unknown key"),
    (("precisions: [fp32, int8]", "precisions: [fp32, int4]"),
     r"precisions\[1\]: expected one of fp32, fp16, int8, got 'int4'"),
    (("  - name: tensorflow", "  - name: tensorflw"),
     r"runtimes\[2\].name: expected one of onnxruntime"),
    (("memory_budget_mb: 2048", "memory_budget_mb: lots"),
     "memory_budget_mb: expected an integer, got 'lots'"),
])
def test_profile_typo_names_key(tmp_path: Path, edit, message):
    text = (SOURCE_PROFILES_DIR / "x86_64-generic.yaml").read_text()
    assert edit[0] in text
    path = tmp_path / "x86_64-generic.yaml"
    path.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(ConfigError, match=message):
        load_profile(path)


def test_wheel_ships_profiles(tmp_path) -> None:
    """A wheel install, as Ansible does it, finds the profiles without the source tree."""
    import subprocess
    import sys
    import zipfile

    from tests.conftest import REPO_ROOT

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(REPO_ROOT)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("facenet_edge_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    folder = "/share/facenet-edge-agent/device_profiles/"
    shipped = {name.rsplit("/", 1)[-1] for name in names if folder in name}
    expected = {p.name for p in SOURCE_PROFILES_DIR.glob("*.yaml")}
    assert shipped == expected
