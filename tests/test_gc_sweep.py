"""`dispo gc` after a reboot (the journals on tmpfs are gone): build, `--from` and fetch directories whose
session id has no journal are swept, and a build tree's mounts are undone before anything is deleted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispo.imagebuild.owner import OWNER_FILE
from tests.worlds import is_mounted

pytestmark = pytest.mark.root


def test_gc_sweeps_build_from_and_fetch_dirs_without_a_journal(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs inside a build tree")
    ws, state, cache = tmp_path / "ws", tmp_path / "state", tmp_path / "cache"
    build = cache / "images" / ".build-0badc0de-minimal"
    from_ = cache / "images" / ".from-0badc0de-mychromium"
    fetch = ws / ".fetch-0badc0de"
    proc_mnt = build / "root" / "proc"
    for d in (proc_mnt, from_, fetch):
        d.mkdir(parents=True)
    (fetch / "rootfs.ext4").write_text("half a download")
    for d in (build, from_):
        (d / OWNER_FILE).write_text(f"{state}\n")
    other = cache / "images" / ".build-0ddba11a-minimal"  # another dispo's (another state dir) build: not ours to sweep
    other.mkdir()
    (other / OWNER_FILE).write_text("/run/another-dispo\n")
    kept = cache / "images" / "minimal-3accf824b6805c63"  # finished builds are the cache, not orphans
    kept.mkdir()
    # A killed mmdebstrap leaves /proc mounted in its tree: gc must unmount, not delete through it.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(proc_mnt)], check=True)
    (proc_mnt / "must-not-be-deleted-through-a-mount").write_text("x")
    try:
        env = dict(os.environ, DISPO_WORKSPACE=str(ws), DISPO_STATE_DIR=str(state), DISPO_CACHE_DIR=str(cache),
                   DISPO_CONFIG="")
        p = subprocess.run([sys.executable, "-m", "dispo", "gc"], env=env, capture_output=True, text=True,
                           timeout=60, check=False)
        assert p.returncode == 0, p.stderr
        for d in (build, from_, fetch):
            assert not d.exists() and f"removed orphan {d}" in p.stdout, p.stdout
        assert kept.exists() and other.exists() and not is_mounted(proc_mnt)
    finally:
        if is_mounted(proc_mnt):
            subprocess.run(["umount", "-l", str(proc_mnt)], check=False)
