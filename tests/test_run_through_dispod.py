"""`dispo run` through dispod: the request goes as it was typed and is checked once, where the session is made
(dispod, with its own config), with the same one-line errors as in-process. dispod runs as a process on the
fake machinery (tests/fakes.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.client import DispodClient
from dispo.config import Config
from tests import fakes
from tests.fakeworld import (
    SAFETY_S,
    cfg,
)

__all__ = ["cfg"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

DISPO = [sys.executable, "-m", "dispo.cli.main"]


@pytest.fixture
def dispod(cfg: Config, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "dispod.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*DISPO[:2], "dispo.daemon.main", "--machinery", "tests.fakes:machinery"],
                                env=fakes.env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=fakes.REPO)
    try:
        deadline = time.monotonic() + SAFETY_S
        while (client := DispodClient.available(cfg)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        client.close()
        yield log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SAFETY_S)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DISPO, "run", *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=SAFETY_S, cwd=fakes.REPO, check=False)


def test_the_request_is_checked_by_dispod_not_against_the_clis_config(tmp_path: Path, dispod: Path) -> None:
    """The CLI's own workspace has no image 'minimal'; dispod's has: the session is dispod's to check."""
    elsewhere = tmp_path / "empty-workspace"
    elsewhere.mkdir()
    env = dict(fakes.env(tmp_path), DISPO_WORKSPACE=str(elsewhere))
    p = _run(env, "--image", "minimal", "--", "sh", "-c", "echo made by dispod")
    assert p.returncode == 0, p.stderr
    assert "made by dispod" in p.stdout
    assert "starting" in dispod.read_text()  # dispod made it


def test_bad_input_through_dispod_is_the_same_one_line_error(tmp_path: Path, dispod: Path) -> None:
    for args, text in ((("--image", "minimal", "--memory", "1", "--", "true"), "memory_mib 1 is out of range"),
                       (("--display", "web", "--", "true"), "a display goes with a profile"),
                       (("--image", "nope", "--", "true"), "image 'nope' not found")):
        p = _run(fakes.env(tmp_path), *args)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 1 and len(lines) == 1, (args, p.stderr)
        assert lines[0].startswith(f"dispo: error: {text}") and "(hint: " in lines[0], lines[0]
