"""Kill -9 during a snapshot apply: the gallery file holds the old version or the new one.

A child process opens a gallery at version 1 and applies a 30,000-identity
snapshot as version 2 in a loop of fresh files. The test kills it with SIGKILL
at several points during the apply and checks the file's version and rows.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CHILD = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    from agent.gallery import Gallery
    from agent.gallery_protocol import IdentityChange

    path, count = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((count, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    gallery = Gallery(path, "crash-model", 16)
    if gallery.version == 0:
        gallery.apply_snapshot("g", 1, [IdentityChange("old", "Old", "add", 0, 1)], rows[:1])
    changes = [IdentityChange(f"id-{i}", "N", "add", i, 1) for i in range(count)]
    print("applying", flush=True)
    gallery.apply_snapshot("g", 2, changes, rows)
    print("applied", flush=True)
""")
IDENTITIES = 30_000


def read_state(path: Path) -> tuple[int, int, bool]:
    with sqlite3.connect(path) as db:
        version = int(db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
        rows = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        has_old = db.execute("SELECT 1 FROM identities WHERE identity_id = 'old'").fetchone()
    return version, rows, has_old is not None


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.15, 0.3, 0.6])
def test_kill_during_snapshot_apply(tmp_path: Path, delay_s: float) -> None:
    path = tmp_path / "gallery.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(IDENTITIES)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "applying"
    time.sleep(delay_s)
    child.send_signal(signal.SIGKILL)
    child.wait(10)

    version, rows, has_old = read_state(path)

    assert (version, rows, has_old) in {(1, 1, True), (2, IDENTITIES, False)}
    # The agent reopens the file as it would after a restart.
    from agent.gallery import Gallery

    reopened = Gallery(path, "crash-model", 16)
    assert reopened.version == version
    assert reopened.embedding_count == rows
    reopened.close()
