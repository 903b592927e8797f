"""A Debian board stand-in for the Ansible tests: a copy of a debootstrapped root with sshd.

scripts/build-test-target.sh builds the root once in .cache/ansible-target/rootfs.
`DebianTarget` copies it, makes an SSH key pair and a host key for this run, and
starts the root's own sshd on 127.0.0.1 inside it. sshd runs chrooted in a
private mount namespace (unshare --mount), with /proc, /sys and /dev/pts
mounted there only, so nothing leaks into the host's mount table and the mounts
go away with the last process inside. systemd is installed in the root but is
not running, as in a chroot that prepares a board image.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.broker import free_port

HOST = "127.0.0.1"
LOGIN_USER = "deploy"
STARTUP_TIMEOUT_S = 10.0

# $1 is the root, $2 the sshd config inside it. The mounts exist only in the
# namespace that unshare creates for this shell and sshd.
_SSHD_LAUNCHER = r"""
set -e
mount -t proc proc "$1/proc"
mount --rbind /sys "$1/sys"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts"
exec chroot "$1" /usr/sbin/sshd -D -e -f "$2"
"""


def missing_requirements() -> str | None:
    """Return why a target cannot be started on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "the Ansible target needs root, to chroot and mount inside a private namespace"
    for tool in ("unshare", "chroot", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not found; install the Debian packages util-linux, coreutils " \
                   "and openssh-client"
    return None


class DebianTarget:
    """A throw-away copy of the pristine root, reachable over SSH as `deploy` with sudo."""

    def __init__(self, pristine_root: Path, workdir: Path) -> None:
        self.pristine_root = pristine_root
        self.workdir = workdir
        self.root = workdir / "rootfs"
        self.port = free_port()
        self.client_key = workdir / "id_ed25519"
        self.log_path = workdir / "sshd.log"
        self._sshd: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Copy the root, install fresh keys and start sshd; return once it accepts TCP."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.pristine_root), str(self.root)],
                       check=True)
        self._make_keys()
        # sudo looks up the host name, which the chroot shares with this machine.
        with self.path("/etc/hosts").open("a") as hosts:
            hosts.write(f"127.0.1.1 {socket.gethostname()}\n")
        config = "/etc/ssh/sshd_test_config"
        self.path(config).write_text(self._sshd_config())
        self._sshd = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private",
             "sh", "-c", _SSHD_LAUNCHER, "sshd-launcher", str(self.root), config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
        )
        self._wait_until_listening()

    def stop(self) -> None:
        """Stop sshd and every process still running inside this copy of the root."""
        if self._sshd is not None and self._sshd.poll() is None:
            self._sshd.terminate()
            try:
                self._sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._sshd.kill()
                self._sshd.wait(timeout=5)
        self._sshd = None
        for pid in self.processes_inside():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def path(self, inside: str) -> Path:
        """Return the host path of `inside`, an absolute path on the target."""
        return self.root / inside.lstrip("/")

    def processes_inside(self, command_part: str = "") -> list[int]:
        """Return the ids of processes whose root is this target and whose command line
        contains `command_part`."""
        found = []
        root = str(self.root.resolve())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "root") != root:
                    continue
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # the process ended, or it is not ours to inspect
            if command_part in command:
                found.append(int(entry.name))
        return found

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the target as `deploy` and return its result."""
        return subprocess.run(
            ["ssh", *self.ssh_options(), "-p", str(self.port), f"{LOGIN_USER}@{HOST}", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes",
        ]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _make_keys(self) -> None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ansible-test",
                        "-f", str(self.client_key)], check=True)
        host_key = self.path("/etc/ssh/test_host_ed25519_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "target-host",
                        "-f", str(host_key)], check=True)

        uid, gid = self._login_ids()
        ssh_dir = self.path(f"/home/{LOGIN_USER}/.ssh")
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        for path in (ssh_dir, authorized):
            os.chown(path, uid, gid)

    def _login_ids(self) -> tuple[int, int]:
        for line in self.path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == LOGIN_USER:
                return int(fields[2]), int(fields[3])
        raise RuntimeError(f"user {LOGIN_USER} missing from {self.root}/etc/passwd; "
                           "rebuild the root with scripts/build-test-target.sh")

    def _sshd_config(self) -> str:
        return "\n".join([
            f"Port {self.port}",
            f"ListenAddress {HOST}",
            "HostKey /etc/ssh/test_host_ed25519_key",
            "PidFile none",
            # PAM would want a full login stack; the key is the only way in.
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            f"AllowUsers {LOGIN_USER}",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "Subsystem sftp internal-sftp",
            "",
        ])

    def _wait_until_listening(self) -> None:
        assert self._sshd is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._sshd.poll() is not None:
                raise RuntimeError(f"sshd exited with status {self._sshd.returncode} at start; "
                                   f"log:\n{self.log_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not accept connections on {HOST}:{self.port} within "
                           f"{STARTUP_TIMEOUT_S} s; log:\n{self.log_text()}")
