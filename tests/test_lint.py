"""Lint and type checks run as a test too: ruff and mypy --strict over src, tests and bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [["ruff", "check", "src", "tests", "bench"], ["mypy"]], ids=["ruff", "mypy"])
def test_clean(argv: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=600,
                       check=False, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
