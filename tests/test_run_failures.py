"""`dispo run` failure paths on real QEMU: one line naming the cause, the console tail, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dispo import config
from dispo.storage.images import ImageStore
from tests.guests import listing, qemu_processes
from tests.netns import NetWorld

pytestmark = [pytest.mark.root, pytest.mark.vm]


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("dispo: error: ")]


def variant(w: NetWorld, name: str, *, kernel: Path | None = None, cmdline: tuple[str, ...] | None = None,
            drop: str = "") -> None:
    """Image `name`: the minimal image with another kernel file, kernel arguments, or a file missing."""
    cfg = config.load(w.config, env={**os.environ, **w.env()})
    store = ImageStore(cfg)
    base = store.get("minimal")
    meta = json.loads((base.path / "image.json").read_text())
    files = {"vmlinuz": kernel or base.path / "vmlinuz", "initrd.img": base.path / "initrd.img"}
    if drop:
        del files[drop]
    extra = {k: meta[k] for k in ("kernel", "initrd", "cmdline", "arch", "vmms")}
    if cmdline is not None:
        extra["cmdline"] = list(cmdline)
    store.import_(base.rootfs, name, quiet=True, extra_files=files, extra_meta=extra)


def test_image_missing(vm_world: NetWorld) -> None:
    before = listing(vm_world)
    p = vm_world.dispo("run", "--image", "nope", "--", "true")
    assert p.returncode == 1
    assert error_lines(p.stderr) == [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "image 'nope' not found" in p.stderr and "(hint: " in p.stderr
    assert listing(vm_world) == before


def test_kernel_file_missing(vm_world: NetWorld) -> None:
    variant(vm_world, "nokernel", drop="vmlinuz")
    before = listing(vm_world)
    p = vm_world.dispo("run", "--image", "nokernel", "--", "true")
    assert p.returncode == 1
    (line,) = error_lines(p.stderr)
    assert "kernel file" in line and "vmlinuz is missing" in line, line
    assert listing(vm_world) == before


def test_vmm_exits_at_once(vm_world: NetWorld, tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"this is not a kernel\n" * 4096)
    variant(vm_world, "junkkernel", kernel=junk)
    before = listing(vm_world)
    p = vm_world.dispo("run", "--image", "junkkernel", "--", "true", timeout=120)
    assert p.returncode == 1
    (line,) = error_lines(p.stderr)
    assert "QEMU exited at once" in line, p.stderr
    assert "kernel" in line.lower()  # QEMU's own message about the kernel it could not load
    assert listing(vm_world) == before


def test_guest_never_ready(vm_world: NetWorld) -> None:
    # init=/bin/cat: the kernel boots, but nothing starts sshd, so the deadline must fire.
    variant(vm_world, "noinit", cmdline=("console=ttyS0", "root=/dev/vda", "rw", "init=/bin/cat", "panic=-1"))
    before = listing(vm_world)
    p = vm_world.dispo("run", "--image", "noinit", "--ready-timeout", "20", "--", "true", timeout=180)
    assert p.returncode == 1
    (line,) = error_lines(p.stderr)
    assert "did not answer on SSH within 20 s" in line, line
    assert "guest console (last lines):" in p.stderr
    assert "init-bottom" in p.stderr  # the tail of the real console log
    assert listing(vm_world) == before


def test_guest_dies_while_the_command_runs(vm_world: NetWorld) -> None:
    w = vm_world
    before = listing(w)
    proc = w.spawn(w.dispo_argv("run", "--", "sleep", "600"), env=w.env(), stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list((w.state_dir / "sessions").glob("*/ssh.json")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    (vmm,) = qemu_processes(w)
    os.kill(int(vmm.split()[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "the guest stopped while the command ran" in lines[0] and "status -9" in lines[0], lines[0]
    assert listing(w) == before
