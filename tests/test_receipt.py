"""The disposal receipt and `dispo verify`, with fake machinery (tests/fakes.py): what they report is
checked against the host, and a receipt that is not clean makes the session fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dispo import receipt
from dispo.config import Config
from dispo.errors import NotClean
from dispo.runtime import STEPS, Runtime, Step, build
from dispo.runtime.steps import Bringup
from tests import fakes
from tests.fakeworld import (
    OWNER_SCRIPT,
    cfg,
)

__all__ = ["cfg"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)


def dispo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispo", *args], env=fakes.env(tmp_path), capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL, cwd=fakes.REPO)


def test_a_clean_session_gets_a_clean_receipt(cfg: Config, tmp_path: Path) -> None:
    rt = Runtime(cfg, machinery=fakes.machinery())
    live = rt.start(build(cfg, command=["true"]))
    assert live.wait(30)
    r = live.receipt
    assert r is not None and r.clean and r.leftovers == [] and r.image_unchanged is True
    # disk, fake VMM process, the command's ssh stand-in: every recorded object, plus the state dir
    assert r.checked >= 4
    lines = (cfg.workspace / receipt.RECEIPTS).read_text().splitlines()
    assert json.loads(lines[-1])["session_id"] == live.id
    shown = dispo(tmp_path, "receipt", "--last")
    assert shown.returncode == 0 and f"session {live.id}: clean" in shown.stdout, shown.stderr
    assert "image minimal" in shown.stdout and "unchanged" in shown.stdout
    as_json = json.loads(dispo(tmp_path, "receipt", live.id, "--json").stdout)
    assert as_json["clean"] is True and as_json["exit_status"] == 0


def test_an_image_written_during_the_session_is_not_clean(cfg: Config) -> None:
    """Something writes the known-good image while a session runs (here a step made for the test): the
    receipt's image proof catches it and the session ends with NotClean."""

    def tamper(b: Bringup) -> None:
        assert b.image is not None
        os.chmod(b.image.rootfs, 0o644)
        with open(b.image.rootfs, "r+b") as f:
            f.seek(4096)
            f.write(b"tampered")

    steps = STEPS.insert_after("disk", Step("tamper", tamper))
    rt = Runtime(cfg, machinery=fakes.machinery())
    live = rt.start(build(cfg, command=["true"]), steps=steps)
    assert live.wait(30)
    assert live.receipt is not None and not live.receipt.clean and live.receipt.image_unchanged is False
    assert isinstance(live.error, NotClean) and "image minimal changed" in live.error.message


@pytest.mark.root  # gc and verify read the host's nftables
def test_verify_finds_what_a_killed_owner_left_and_nothing_after_gc(cfg: Config, tmp_path: Path) -> None:
    clean = dispo(tmp_path, "verify")
    assert clean.returncode == 0 and "nothing of dispo's" in clean.stdout, clean.stdout + clean.stderr
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, str(fakes.config_file(tmp_path))],
                             stdout=subprocess.PIPE,
                             text=True, cwd=fakes.REPO, env=fakes.env(tmp_path))
    try:
        assert owner.stdout is not None
        sid = owner.stdout.readline().strip()
        live = dispo(tmp_path, "verify")
        assert live.returncode == 0, live.stdout  # a live session is not an orphan
        owner.kill()
        owner.wait()
        dirty = dispo(tmp_path, "verify")
        assert dirty.returncode == 1, dirty.stdout
        assert f"sessions/{sid}" in dirty.stdout and f"session disk {cfg.disks_dir / sid}" in dirty.stdout
        gc = dispo(tmp_path, "gc")
        assert gc.returncode == 0 and f"reclaimed session {sid}" in gc.stdout, gc.stdout + gc.stderr
        after = dispo(tmp_path, "verify")
        assert after.returncode == 0, after.stdout
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid in fakes.fake_vmm_pids(state_dir=cfg.state_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.root  # gc and verify read the host's nftables
def test_verify_finds_a_process_that_names_a_dead_session(cfg: Config, tmp_path: Path) -> None:
    # What a VMM left by an owner that died in a way no parent-death signal covers would look like.
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-name", "dispo-0badc0de",
                              str(cfg.state_dir / "sessions" / "0badc0de" / "qmp.sock")])
    try:
        found = dispo(tmp_path, "verify")
        assert found.returncode == 1 and f"process {stray.pid} of session 0badc0de" in found.stdout, found.stdout
    finally:
        stray.kill()
        stray.wait()
    assert dispo(tmp_path, "verify").returncode == 0


@pytest.mark.root
@pytest.mark.parametrize("backend", ["btrfs", "reflink"])
def test_receipt_is_clean_on_a_snapshot_workspace(tmp_path: Path, backend: str) -> None:
    """On btrfs each session disk is a snapshot of the image's subvolume (which moves the subvolume's
    generation) or a reflink of its file: neither may count as a change of the image."""
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount btrfs")
    from tests.worlds import loop_fs

    with loop_fs(tmp_path / "fs", "btrfs", "1G") as mnt:
        cfg = fakes.config(tmp_path, workspace=mnt / "ws", backend=backend)
        rt = Runtime(cfg, machinery=fakes.machinery())
        for _ in range(2):
            live = rt.start(build(cfg, command=["true"]))
            assert live.wait(30)
            assert live.receipt is not None and live.receipt.clean, live.receipt
            assert live.receipt.image_unchanged is True
