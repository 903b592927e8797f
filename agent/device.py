"""Device profiles: what each board has and how the agent should run on it.

A profile is a YAML file in device_profiles/ (see x86_64-generic.yaml for
every key). It names the signs that identify the board, its cores and memory
budget, the runtimes to try in order with their providers or delegates, and
the precisions, batch sizes and latency budget that `tune` may use. Profiles
are validated like the config, so a misspelt key is rejected with its name.

Detection scores each profile by the rules it has and the machine meets:
a profile matches only if every rule it sets is met, and among matches the
one that sets the most rules wins (so jetson-tx2 beats aarch64-generic).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agent.config import ConfigError, parse_section

log = logging.getLogger(__name__)

# A source checkout or editable install keeps the profiles next to the package; a
# wheel installs them under <prefix>/share (see data-files in pyproject.toml).
SOURCE_PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
INSTALLED_PROFILES_DIR = Path(sys.prefix) / "share" / "facenet-edge-agent" / "device_profiles"


def default_profiles_dir() -> Path:
    """Return the folder of the profiles shipped with the agent."""
    if SOURCE_PROFILES_DIR.is_dir():
        return SOURCE_PROFILES_DIR
    return INSTALLED_PROFILES_DIR


PRECISIONS = ("fp32", "fp16", "int8")
RUNTIMES = ("onnxruntime", "tflite", "tensorflow")


@dataclass(frozen=True)
class DetectionRules:
    # Substrings of /proc/device-tree/model; one must occur.
    device_tree_model: list[str] = field(default_factory=list)
    # Files that must all exist, such as /etc/nv_tegra_release.
    files: list[str] = field(default_factory=list)
    # Values of platform.machine(); one must equal it.
    machine: list[str] = field(default_factory=list)
    # CPU feature flags (x86 "flags" or Arm "Features" of /proc/cpuinfo); all must be present.
    cpu_flags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RuntimeChoice:
    name: str = ""  # onnxruntime, tflite or tensorflow
    # ONNX Runtime execution providers or TFLite delegates, in order of preference.
    accelerators: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceProfile:
    name: str = ""
    description: str = ""
    detect: DetectionRules = field(default_factory=DetectionRules)
    cores: int = 0  # 0 means os.cpu_count()
    memory_budget_mb: int = 1024  # resident memory the agent's models may use
    latency_budget_ms: float = 1000.0  # maximum time of one embedder batch, per frame
    runtimes: list[RuntimeChoice] = field(default_factory=list)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])

    def runtime_choice(self, name: str) -> RuntimeChoice | None:
        return next((choice for choice in self.runtimes if choice.name == name), None)

    @property
    def threads(self) -> int:
        return self.cores or os.cpu_count() or 1


def load_profile(path: Path) -> DeviceProfile:
    """Read and validate one profile; raise ConfigError naming the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read device profile: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    profile: DeviceProfile = parse_section(DeviceProfile, raw, source=str(path))
    _check_profile(profile, path)
    return profile


def _check_profile(profile: DeviceProfile, path: Path) -> None:
    if profile.name != path.stem:
        raise ConfigError(f"{path}: name: expected {path.stem!r} (the file name), "
                          f"got {profile.name!r}")
    if not profile.runtimes:
        raise ConfigError(f"{path}: runtimes: expected at least one runtime")
    for index, choice in enumerate(profile.runtimes):
        if choice.name not in RUNTIMES:
            raise ConfigError(f"{path}: runtimes[{index}].name: expected one of "
                              f"{', '.join(RUNTIMES)}, got {choice.name!r}")
    for index, precision in enumerate(profile.precisions):
        if precision not in PRECISIONS:
            raise ConfigError(f"{path}: precisions[{index}]: expected one of "
                              f"{', '.join(PRECISIONS)}, got {precision!r}")
    if not profile.batch_sizes or any(b < 1 for b in profile.batch_sizes):
        raise ConfigError(f"{path}: batch_sizes: expected positive integers, "
                          f"got {profile.batch_sizes!r}")
    for key in ("memory_budget_mb", "latency_budget_ms", "cores"):
        if getattr(profile, key) < 0:
            raise ConfigError(f"{path}: {key}: must be at least 0, got {getattr(profile, key)}")


def load_profiles(directory: Path) -> dict[str, DeviceProfile]:
    """Load every *.yaml in `directory`, keyed by name; raise ConfigError on the first bad one."""
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise ConfigError(f"{directory}: no device profiles (*.yaml) found")
    return {path.stem: load_profile(path) for path in paths}


@dataclass(frozen=True)
class MachineFacts:
    """Machine properties that detection compares, read once so tests can supply their own."""

    device_tree_model: str
    existing_files: frozenset[str]
    machine: str
    cpu_flags: frozenset[str]


def read_machine_facts(root: Path = Path("/"), files: tuple[str, ...] = ()) -> MachineFacts:
    """Read the device-tree model, the CPU flags and which of `files` exist under `root`."""
    model_path = root / "proc/device-tree/model"
    try:
        model = model_path.read_bytes().decode("utf-8", "replace").rstrip("\0\n ")
    except OSError:
        model = ""
    flags: set[str] = set()
    try:
        for line in (root / "proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    existing = frozenset(name for name in files if (root / name.lstrip("/")).exists())
    return MachineFacts(model, existing, platform.machine(), frozenset(flags))


def match_score(profile: DeviceProfile, facts: MachineFacts) -> int | None:
    """Return how many rule kinds `profile` sets and `facts` meet, or None if one fails."""
    rules = profile.detect
    score = 0
    if rules.device_tree_model:
        if not any(text in facts.device_tree_model for text in rules.device_tree_model):
            return None
        score += 1
    if rules.files:
        if not all(name in facts.existing_files for name in rules.files):
            return None
        score += 1
    if rules.machine:
        if facts.machine not in rules.machine:
            return None
        score += 1
    if rules.cpu_flags:
        if not set(rules.cpu_flags) <= facts.cpu_flags:
            return None
        score += 1
    return score


def detect_profile(profiles: dict[str, DeviceProfile],
                   facts: MachineFacts | None = None) -> DeviceProfile:
    """Return the best-matching profile; raise ConfigError if none matches."""
    if facts is None:
        files = tuple(sorted({f for p in profiles.values() for f in p.detect.files}))
        facts = read_machine_facts(files=files)
    scored = [(score, name) for name, profile in profiles.items()
              if (score := match_score(profile, facts)) is not None]
    if not scored:
        raise ConfigError(
            f"no device profile matches this machine ({facts.machine}, device-tree model "
            f"{facts.device_tree_model!r}); set device.profile to one of "
            f"{', '.join(sorted(profiles))}"
        )
    score, name = max(scored)
    log.info("detected device profile %s (%d rules matched; machine %s, model %r)",
             name, score, facts.machine, facts.device_tree_model)
    return profiles[name]


def resolve_profile(name: str, directory: Path | None) -> DeviceProfile:
    """Return the profile `name` from `directory`, or the detected one when `name` is auto."""
    profiles = load_profiles(directory or default_profiles_dir())
    if name == "auto":
        return detect_profile(profiles)
    if name not in profiles:
        raise ConfigError(f"device.profile: unknown profile {name!r}; expected auto or one of "
                          f"{', '.join(sorted(profiles))}")
    log.info("using device profile %s from the config", name)
    return profiles[name]
