"""A guest image moved as a file (`dispo image export` / `import`) boots: the same sha256, and a command runs in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netns import NetWorld

pytestmark = [pytest.mark.root, pytest.mark.vm]


def test_a_loaded_image_boots(vm_world: NetWorld, tmp_path: Path) -> None:
    w = vm_world
    ls = w.dispo("image", "ls", "--digests")
    assert ls.returncode == 0, ls.stderr
    digest = next(ln.split()[-1] for ln in ls.stdout.splitlines() if ln.split()[0] == "minimal")
    saved = tmp_path / "minimal.dimg"
    p = w.dispo("image", "export", "minimal", saved, "--quiet", timeout=300)
    assert p.returncode == 0 and digest in p.stdout, p.stderr
    p = w.dispo("image", "import", saved, "--name", "moved", "--sha256", digest, "--quiet", timeout=300)
    assert p.returncode == 0 and f"sha256 {digest}" in p.stdout, p.stderr
    p = w.dispo("run", "--image", "moved", "--", "sh", "-c", "echo booted; exit 3", timeout=240)
    assert p.returncode == 3 and "booted" in p.stdout, p.stderr
