"""The Ansible role and playbooks, run for real against a Debian root over SSH.

A copy of the root that scripts/build-test-target.sh debootstraps plays a
freshly flashed board (see tests/ansible_target.py). The tests build the agent
wheel, fetch its dependency wheels into a wheelhouse, keep the broker password
in an Ansible Vault file and run ansible/deploy.yml and ansible/rollback.yml as
an operator would. Then they check what landed in the root, run
`systemd-analyze verify` on the installed unit and start the installed agent
inside the root, as its unit would, against a real mosquitto.

systemd is installed in the root but does not run, so the role takes its path
for board images: it enables the unit without starting it, and skips
daemon-reload, the restart handler and the online wait. The online wait is run
on its own once the test has started the agent by hand.

The tests in this module share one target and run in file order: deploy twice,
inspect, deploy a second release, roll back twice, then try damaged models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_target import DebianTarget, missing_requirements
from tests.broker import MosquittoBroker, Subscriber, find_mosquitto

REPO_ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = REPO_ROOT / "ansible"
PRISTINE_ROOT = Path(os.environ.get("FACENET_AGENT_TARGET_ROOT",
                                    REPO_ROOT / ".cache" / "ansible-target" / "rootfs"))
WHEELHOUSE = REPO_ROOT / ".cache" / "wheelhouse"
TARGET_PYTHON = "3.11"  # Debian 12's python3, in the root that build-test-target.sh makes
BOARD = "board-01"
MQTT_PASSWORD = "board-01-broker-secret"
VAULT_PASSWORD = "vault-passphrase-for-tests"
STATUS_TOPIC = f"facenet/{BOARD}/status"
VIDEO_ON_TARGET = "/var/lib/facenet-agent/test.avi"
CREDENTIALS_ON_TARGET = "/run/credentials/facenet-agent.service"
# Ansible, pip and the agent's start share 2 cores with the rest of the suite.
PLAYBOOK_TIMEOUT_S = 900
AGENT_ONLINE_TIMEOUT_S = 180


@dataclass(frozen=True)
class PlaybookRun:
    returncode: int
    output: str
    recap: dict[str, int]  # ok, changed, unreachable, failed, skipped, ... for BOARD


def parse_recap(output: str) -> dict[str, int]:
    match = re.search(rf"^{re.escape(BOARD)}\s*:\s*(.+)$", output, re.MULTILINE)
    if match is None:
        return {}
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def ansible_tool(name: str) -> str:
    """Return the path of an Ansible command, preferring the test's virtual environment."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found; install the test extra: pip install -e '.[test]'")
    return found


class Deployment:
    """The target, the broker, the inventory and the vault that the playbooks run with."""

    def __init__(self, workdir: Path, target: DebianTarget, broker: MosquittoBroker,
                 wheel: Path, models: Path) -> None:
        self.workdir = workdir
        self.target = target
        self.broker = broker
        self.wheel = wheel
        self.models = models
        self.inventory = workdir / "inventory" / "hosts.yml"
        self.vault_password_file = workdir / "vault-password"
        # ssh's control sockets need a short path; pytest's tmp_path can be long.
        self.control_dir = Path(tempfile.mkdtemp(prefix="fa-ssh-"))
        self.env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_HOME": str(workdir / "ansible-home"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
        }

    def write_inventory(self) -> None:
        inventory_dir = self.inventory.parent
        (inventory_dir / "group_vars" / "all").mkdir(parents=True)
        host = {
            "ansible_host": self.target_host,
            "ansible_port": self.target.port,
            "ansible_user": "deploy",
            "ansible_ssh_private_key_file": str(self.target.client_key),
            "ansible_ssh_common_args": " ".join(self.target.ssh_options()),
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        hosts = {"facenet_agents": {"children": {"x86_64": {"hosts": {BOARD: host}}}}}
        self.inventory.write_text(yaml.safe_dump(hosts))

        settings = {
            "facenet_agent_profile": "x86_64",
            "facenet_agent_wheel": str(self.wheel),
            "facenet_agent_wheelhouse": str(WHEELHOUSE),
            "facenet_agent_models_dir": str(self.models),
            "facenet_agent_source": VIDEO_ON_TARGET,
            "facenet_agent_mqtt_host": self.broker.host,
            "facenet_agent_mqtt_port": self.broker.port,
            "facenet_agent_mqtt_username": BOARD,
            "facenet_agent_mqtt_password":
                "{{ vault_facenet_agent_mqtt_passwords[inventory_hostname] }}",
            # Any config key can be set this way; test_config_written_and_valid
            # checks that this one arrives.
            "facenet_agent_config": {"detection": {"min_face_size": 40}},
        }
        (inventory_dir / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(settings))

        self.vault_password_file.write_text(VAULT_PASSWORD + "\n")
        vault = inventory_dir / "group_vars" / "all" / "vault.yml"
        vault.write_text(yaml.safe_dump(
            {"vault_facenet_agent_mqtt_passwords": {BOARD: MQTT_PASSWORD}}))
        subprocess.run([ansible_tool("ansible-vault"), "encrypt", "--vault-password-file",
                        str(self.vault_password_file), str(vault)],
                       check=True, env=self.env, capture_output=True, timeout=120)

    @property
    def target_host(self) -> str:
        return "127.0.0.1"

    def playbook(self, playbook: Path, **extra_vars: Any) -> PlaybookRun:
        command = [ansible_tool("ansible-playbook"), "-i", str(self.inventory),
                   "--vault-password-file", str(self.vault_password_file), str(playbook)]
        if extra_vars:
            command += ["--extra-vars", json.dumps(extra_vars)]
        result = subprocess.run(command, capture_output=True, text=True, env=self.env,
                                cwd=ANSIBLE_DIR, timeout=PLAYBOOK_TIMEOUT_S, check=False)
        output = result.stdout + result.stderr
        (self.workdir / f"{playbook.stem}-{time.monotonic_ns()}.log").write_text(output)
        return PlaybookRun(result.returncode, output, parse_recap(output))

    def deploy(self, **extra_vars: Any) -> PlaybookRun:
        return self.playbook(ANSIBLE_DIR / "deploy.yml", **extra_vars)

    def rollback(self) -> PlaybookRun:
        return self.playbook(ANSIBLE_DIR / "rollback.yml")

    def close(self) -> None:
        shutil.rmtree(self.control_dir, ignore_errors=True)


def build_wheel(destination: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "--disable-pip-version-check", "-w", str(destination), str(REPO_ROOT)],
                   check=True, timeout=600)
    (wheel,) = destination.glob("facenet_edge_agent-*.whl")
    return wheel


def fill_wheelhouse(wheel: Path) -> None:
    """Download the wheels that the agent with the onnxruntime extra needs, once.

    pip keeps files that are already there, so this reads only the index after
    the first run. The agent's own wheel is not kept: the role copies it apart.
    """
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    # Wheels for the root's Python 3.11, whatever Python runs the tests.
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                    "--disable-pip-version-check", "--only-binary=:all:",
                    "--python-version", TARGET_PYTHON, "-d", str(WHEELHOUSE),
                    f"{wheel}[onnxruntime]"], check=True, timeout=900)
    for stale in WHEELHOUSE.glob("facenet_edge_agent-*.whl"):
        stale.unlink()


def write_face_video(photo: Path, path: Path, frames: int) -> None:
    """Write an MJPEG AVI that shows `photo` in every frame."""
    import cv2

    image = cv2.resize(cv2.imread(str(photo)), (320, 240))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for _ in range(frames):
        writer.write(image)
    writer.release()


def user_ids(target: DebianTarget, name: str) -> tuple[int, int]:
    for line in target.path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"user {name} is not in the target's /etc/passwd")


def owner_and_mode(target: DebianTarget, inside: str) -> tuple[int, int, str]:
    info = target.path(inside).stat()
    return info.st_uid, info.st_gid, oct(stat.S_IMODE(info.st_mode))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Deployment]:
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    if not (PRISTINE_ROOT / ".complete").exists():
        message = (f"no Debian root at {PRISTINE_ROOT}; build it with "
                   "`bash scripts/build-test-target.sh`")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    mosquitto = find_mosquitto()
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto is None or mosquitto_passwd is None:
        pytest.skip("mosquitto not found; install the Debian package mosquitto")

    workdir = tmp_path_factory.mktemp("ansible")
    wheel = build_wheel(workdir / "dist")
    fill_wheelhouse(wheel)

    password_file = workdir / "broker-passwords"
    subprocess.run([mosquitto_passwd, "-b", "-c", str(password_file), BOARD, MQTT_PASSWORD],
                   check=True)
    broker = MosquittoBroker(workdir / "mosquitto", executable=mosquitto,
                             extra_config=[f"password_file {password_file}",
                                           "allow_anonymous false"])
    target = DebianTarget(PRISTINE_ROOT, workdir / "target")
    deployment = Deployment(workdir, target, broker, wheel, model_dir)
    try:
        broker.start()
        target.start()
        deployment.write_inventory()
        yield deployment
    finally:
        target.stop()
        broker.close()
        deployment.close()


@pytest.fixture(scope="module")
def first_runs(deployment: Deployment) -> tuple[PlaybookRun, PlaybookRun]:
    return deployment.deploy(), deployment.deploy()


@pytest.fixture(scope="module")
def second_release(deployment: Deployment,
                   first_runs: tuple[PlaybookRun, PlaybookRun]) -> tuple[str, PlaybookRun]:
    """Deploy a release that differs only by its label; return the first one's directory."""
    first_release = os.readlink(deployment.target.path("/opt/facenet-agent/current"))
    return first_release, deployment.deploy(facenet_agent_release_label="second")


@pytest.fixture(scope="module")
def rollback_runs(deployment: Deployment,
                  second_release: tuple[str, PlaybookRun]) -> tuple[PlaybookRun, PlaybookRun]:
    return deployment.rollback(), deployment.rollback()


def test_ansible_lint_passes() -> None:
    result = subprocess.run([ansible_tool("ansible-lint")], cwd=ANSIBLE_DIR,
                            capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1"})

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_first_deploy_changes_target(first_runs: tuple[PlaybookRun, PlaybookRun]) -> None:
    first, _ = first_runs

    assert first.returncode == 0, first.output[-6000:]
    assert first.recap["failed"] == 0
    assert first.recap["unreachable"] == 0
    assert first.recap["changed"] > 0
    assert "is installed and enabled but not started" in first.output


def test_second_deploy_changes_nothing(first_runs: tuple[PlaybookRun, PlaybookRun]) -> None:
    _, second = first_runs

    assert second.returncode == 0, second.output[-6000:]
    assert second.recap["changed"] == 0, second.output[-6000:]
    assert second.recap["failed"] == 0


def test_service_user_created(deployment: Deployment, first_runs: Any) -> None:
    entries = {line.split(":")[0]: line.split(":")
               for line in deployment.target.path("/etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":")
              for line in deployment.target.path("/etc/group").read_text().splitlines()}

    assert "facenet-agent" in entries
    _, _, uid, gid, _, home, shell = entries["facenet-agent"]
    assert int(uid) < 1000  # a system user
    assert home == "/var/lib/facenet-agent"
    assert shell == "/usr/sbin/nologin"
    assert groups["facenet-agent"][2] == gid
    assert "facenet-agent" in groups["video"][3].split(",")


def test_directories_owner_and_mode(deployment: Deployment, first_runs: Any) -> None:
    target = deployment.target
    uid, gid = user_ids(target, "facenet-agent")

    assert owner_and_mode(target, "/opt/facenet-agent") == (0, 0, "0o755")
    assert owner_and_mode(target, "/etc/facenet-agent") == (0, gid, "0o750")
    assert owner_and_mode(target, "/etc/facenet-agent/credentials") == (0, gid, "0o750")
    assert owner_and_mode(target, "/var/lib/facenet-agent") == (uid, gid, "0o750")
    assert owner_and_mode(target, "/var/cache/facenet-agent") == (uid, gid, "0o750")


def test_unit_installed_and_enabled(deployment: Deployment, first_runs: Any) -> None:
    target = deployment.target
    installed = target.path("/etc/systemd/system/facenet-agent.service")
    wants = target.path("/etc/systemd/system/multi-user.target.wants/facenet-agent.service")
    dropin = target.path("/etc/systemd/system/facenet-agent.service.d/10-profile.conf")

    assert installed.read_bytes() == (REPO_ROOT / "systemd" / "facenet-agent.service").read_bytes()
    assert os.readlink(wants) == "/etc/systemd/system/facenet-agent.service"
    lines = dropin.read_text().splitlines()
    assert "WatchdogSec=60" in lines
    assert "SupplementaryGroups=video" in lines
    # systemd 252 in the root: no exponential back-off keys, no fallbacks for old versions.
    assert not any(line.startswith(("RestartSteps=", "SystemCallFilter=")) for line in lines)


def test_installed_unit_verifies(deployment: Deployment, first_runs: Any) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found; install the Debian package systemd")

    result = subprocess.run([analyze, "verify", f"--root={deployment.target.root}",
                             "facenet-agent.service"],
                            capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_config_written_and_valid(deployment: Deployment, first_runs: Any) -> None:
    target = deployment.target
    config_path = target.path("/etc/facenet-agent/agent.yaml")
    config = yaml.safe_load(config_path.read_text())
    _, gid = user_ids(target, "facenet-agent")

    assert owner_and_mode(target, "/etc/facenet-agent/agent.yaml") == (0, gid, "0o640")
    assert config["device_id"] == BOARD
    assert config["models"]["dir"] == "/opt/facenet-agent/current/models"
    assert config["device"]["profiles_dir"] == "/opt/facenet-agent/current/device_profiles"
    assert config["runtime"]["cache_dir"] == "/var/cache/facenet-agent"
    assert config["source"]["uri"] == VIDEO_ON_TARGET
    assert config["detection"]["min_face_size"] == 40
    assert config["mqtt"] == {
        "host": deployment.broker.host,
        "port": deployment.broker.port,
        "topic_prefix": "facenet",
        "username": BOARD,
        "password_credential": "mqtt-password",
    }
    check = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config_path)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr


def test_password_from_vault_root_only(deployment: Deployment, first_runs: Any) -> None:
    target = deployment.target
    first, _ = first_runs

    assert target.path("/etc/facenet-agent/credentials/mqtt-password").read_text() == MQTT_PASSWORD
    assert owner_and_mode(target, "/etc/facenet-agent/credentials/mqtt-password") == (
        0, 0, "0o600")
    assert MQTT_PASSWORD not in first.output


def test_release_layout(deployment: Deployment, first_runs: Any) -> None:
    target = deployment.target
    current = os.readlink(target.path("/opt/facenet-agent/current"))
    record = json.loads(target.path(f"{current}/release.json").read_text())
    manifest = json.loads((deployment.models / "manifest.json").read_text())

    assert current.startswith("/opt/facenet-agent/releases/0.1.0-")
    assert record["release"] == Path(current).name
    assert record["wheel"] == deployment.wheel.name
    assert record["extras"] == ["onnxruntime"]
    assert record["model_formats"] == ["onnx"]
    assert record["manifest_sha256"] == manifest["content_sha256"]
    assert not target.path("/opt/facenet-agent/previous").exists()
    assert not target.path(f"{current}/wheels").exists()
    installed = sorted(p.name for p in target.path(f"{current}/models").iterdir())
    onnx_files = {v["file"] for v in manifest.get("variants", []) if v["format"] == "onnx"}
    expected = {m["file"] for m in manifest["models"].values()} | onnx_files | {"manifest.json"}
    assert installed == sorted(expected)
    profiles = sorted(p.name for p in target.path(f"{current}/device_profiles").iterdir())
    assert profiles == sorted(p.name for p in (REPO_ROOT / "device_profiles").glob("*.yaml"))


def test_installed_models_verify(deployment: Deployment, first_runs: Any) -> None:
    result = deployment.target.ssh(
        "/opt/facenet-agent/current/venv/bin/facenet-agent models verify "
        "/opt/facenet-agent/current/models --formats onnx")

    assert result.returncode == 0, result.stderr
    assert "model files match manifest.json" in result.stdout


def test_wait_online_fails_while_offline(deployment: Deployment, first_runs: Any,
                                         tmp_path: Path) -> None:
    run = deployment.playbook(write_wait_playbook(tmp_path), facenet_agent_online_timeout=2)

    assert run.returncode != 0
    assert run.recap["failed"] == 1
    assert f"no status message on {STATUS_TOPIC}" in run.output


def test_installed_agent_reports_online(deployment: Deployment, first_runs: Any,
                                        example_data: Path, tmp_path: Path) -> None:
    target = deployment.target
    uid, gid = user_ids(target, "facenet-agent")
    photo = sorted((example_data / "val" / "madonna").glob("*.jpg"))[0]
    video = target.path(VIDEO_ON_TARGET)
    write_face_video(photo, video, frames=300)
    os.chown(video, uid, gid)
    emulate_load_credential(target, uid, gid)
    subscriber = deployment.broker.subscriber(STATUS_TOPIC, username=BOARD,
                                              password=MQTT_PASSWORD)
    log_path = tmp_path / "agent.log"

    with log_path.open("w") as log:
        agent = subprocess.Popen(
            ["ssh", *target.ssh_options(), "-p", str(target.port),
             f"deploy@{deployment.target_host}", unit_command_line(target)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_state(subscriber, "online", AGENT_ONLINE_TIMEOUT_S, log_path, agent)
        (pid,) = agent_pids(target)
        # Paused, the agent stays online for the broker (its will fires only after
        # 1.5 keepalives), so the check cannot race the end of the video.
        os.kill(pid, signal.SIGSTOP)
        try:
            run = deployment.playbook(write_wait_playbook(tmp_path))
        finally:
            # sudo stops itself when its command stops, and must resume to reap it.
            for process in target.processes_inside("facenet-agent run"):
                os.kill(process, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        exit_status = agent.wait(timeout=120)
    finally:
        if agent.poll() is None:
            for leftover in agent_pids(target):
                os.kill(leftover, signal.SIGKILL)
            agent.wait(timeout=30)

    assert run.returncode == 0, run.output[-4000:]
    assert f"{BOARD} reports online on {STATUS_TOPIC}" in run.output
    assert exit_status == 0, log_path.read_text()[-4000:]
    wait_for_state(subscriber, "offline", 30, log_path)


def test_new_release_keeps_previous(deployment: Deployment,
                                    second_release: tuple[str, PlaybookRun]) -> None:
    first_release, run = second_release
    target = deployment.target
    current = os.readlink(target.path("/opt/facenet-agent/current"))

    assert run.returncode == 0, run.output[-6000:]
    assert run.recap["changed"] > 0
    assert current != first_release
    assert os.readlink(target.path("/opt/facenet-agent/previous")) == first_release
    releases = sorted(f"/opt/facenet-agent/releases/{p.name}"
                      for p in target.path("/opt/facenet-agent/releases").iterdir())
    assert releases == sorted([first_release, current])


def test_rollback_restores_previous(deployment: Deployment,
                                    second_release: tuple[str, PlaybookRun],
                                    rollback_runs: tuple[PlaybookRun, PlaybookRun]) -> None:
    first_release, _ = second_release
    abandoned = os.readlink(deployment.target.path("/opt/facenet-agent/rolled-back"))
    run, _ = rollback_runs
    target = deployment.target

    assert run.returncode == 0, run.output[-6000:]
    assert run.recap["changed"] > 0
    assert os.readlink(target.path("/opt/facenet-agent/current")) == first_release
    assert not target.path("/opt/facenet-agent/previous").exists()
    assert abandoned != first_release
    assert target.path(f"{abandoned}/release.json").exists()


def test_second_rollback_changes_nothing(rollback_runs: tuple[PlaybookRun, PlaybookRun]) -> None:
    _, again = rollback_runs

    assert again.returncode == 0, again.output[-6000:]
    assert again.recap["changed"] == 0, again.output[-6000:]


def test_damaged_model_stops_rollout(deployment: Deployment, rollback_runs: Any,
                                     tmp_path: Path) -> None:
    target = deployment.target
    before = os.readlink(target.path("/opt/facenet-agent/current"))
    damaged = tmp_path / "models"
    shutil.copytree(deployment.models, damaged, copy_function=os.link)
    (damaged / "pnet.onnx").unlink()  # a new file, so the shared cache stays intact
    (damaged / "pnet.onnx").write_bytes(b"truncated download")

    run = deployment.deploy(facenet_agent_models_dir=str(damaged),
                            facenet_agent_release_label="damaged")

    assert run.returncode != 0
    assert run.recap["failed"] == 1
    assert "pnet.onnx has sha256" in run.output
    assert os.readlink(target.path("/opt/facenet-agent/current")) == before
    releases = list(target.path("/opt/facenet-agent/releases").iterdir())
    unfinished = [p for p in releases if not (p / "release.json").exists()]
    assert len(unfinished) == 1


def write_wait_playbook(directory: Path) -> Path:
    """Write a playbook that runs only the role's online wait."""
    playbook = directory / "wait-online.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Wait for the agent",
        "hosts": "facenet_agents",
        "become": True,
        "gather_facts": False,
        "tasks": [{
            "name": "Run the role's online wait",
            "ansible.builtin.include_role": {"name": "facenet_agent",
                                             "tasks_from": "wait_online.yml"},
        }],
    }], sort_keys=False))
    return playbook


def unit_command_line(target: DebianTarget) -> str:
    """Return a shell command that runs ExecStart= as the installed unit would.

    It takes User=, WorkingDirectory= and Environment= from the installed unit,
    and points CREDENTIALS_DIRECTORY where emulate_load_credential put the password.
    """
    settings: dict[str, list[str]] = {}
    for line in target.path("/etc/systemd/system/facenet-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    environment = " ".join(settings["Environment"] +
                           [f"CREDENTIALS_DIRECTORY={CREDENTIALS_ON_TARGET}"])
    (user,) = settings["User"]
    (workdir,) = settings["WorkingDirectory"]
    (exec_start,) = settings["ExecStart"]
    return (f"sudo -u {user} env {environment} "
            f"sh -c 'cd {workdir} && exec {exec_start}'")


def emulate_load_credential(target: DebianTarget, uid: int, gid: int) -> None:
    """Copy the password where LoadCredential= would put it, readable by the service only."""
    directory = target.path(CREDENTIALS_ON_TARGET)
    directory.mkdir(parents=True, exist_ok=True)
    credential = directory / "mqtt-password"
    shutil.copyfile(target.path("/etc/facenet-agent/credentials/mqtt-password"), credential)
    for path, mode in ((credential, 0o400), (directory, 0o500)):
        os.chown(path, uid, gid)
        path.chmod(mode)


def agent_pids(target: DebianTarget) -> list[int]:
    """Return the ids of the agent's Python processes inside the target."""
    return [pid for pid in target.processes_inside("facenet-agent run")
            if "python" in os.readlink(f"/proc/{pid}/exe")]


def wait_for_state(subscriber: Subscriber, state: str, timeout_s: float, log_path: Path,
                   agent: subprocess.Popen[bytes] | None = None) -> None:
    """Wait for a status message with `state`; fail early when `agent` has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(json.loads(m.payload).get("state") == state for m in subscriber.messages):
            return
        if agent is not None and agent.poll() is not None:
            raise AssertionError(f"the agent exited with status {agent.returncode} before "
                                 f"reporting {state!r}; log:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {state!r} status on {STATUS_TOPIC} within {timeout_s} s; agent "
                         f"log:\n{log_path.read_text()[-4000:]}")
