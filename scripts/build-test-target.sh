#!/usr/bin/env bash
# Build the Debian root that tests/test_ansible_deploy.py deploys to, once, in
# .cache/ansible-target/rootfs. The test copies it for every run, starts an
# sshd inside the copy on 127.0.0.1 and runs the playbook over SSH.
#
# The root is Debian 12 with Python, sudo, an SSH server and systemd's tools
# (systemctl, no running PID 1), plus a user "deploy" with passwordless sudo,
# as on a freshly flashed board. Needs root and the debootstrap package.
# Delete the folder to build it again.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_DIR=.cache/ansible-target
ROOTFS="$TARGET_DIR/rootfs"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,python3-venv,python3-apt,sudo,openssh-server,systemd,procps

if [ -f "$ROOTFS/.complete" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "build-test-target.sh: debootstrap needs root; run it as root or with sudo" >&2
    exit 1
fi

rm -rf "$ROOTFS" "$ROOTFS.partial"
mkdir -p "$TARGET_DIR"
echo "build-test-target.sh: debootstrapping Debian bookworm into $ROOTFS (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS.partial" "$MIRROR" \
    > "$TARGET_DIR/debootstrap.log" 2>&1 || {
    tail -20 "$TARGET_DIR/debootstrap.log" >&2
    exit 1
}

# The login user that Ansible connects as. The "*" password is no password at
# all, but unlike "!" it does not lock the account, which sshd without PAM
# would reject even for key logins.
chroot "$ROOTFS.partial" useradd --create-home --shell /bin/bash deploy
chroot "$ROOTFS.partial" usermod --password '*' deploy
echo 'deploy ALL=(ALL) NOPASSWD: ALL' > "$ROOTFS.partial/etc/sudoers.d/deploy"
chmod 0440 "$ROOTFS.partial/etc/sudoers.d/deploy"

# The test makes its own host key for each run; sshd needs this directory for
# privilege separation.
rm -f "$ROOTFS.partial"/etc/ssh/ssh_host_*
mkdir -p "$ROOTFS.partial/run/sshd"
chroot "$ROOTFS.partial" apt-get clean

touch "$ROOTFS.partial/.complete"
mv "$ROOTFS.partial" "$ROOTFS"
echo "build-test-target.sh: done"
