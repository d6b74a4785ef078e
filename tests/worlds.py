"""Test worlds built by the tests themselves: loop-mounted filesystems, ext4 images, dispo configs.

Everything here cleans up in `finally`, so a failing test leaves no loop device or mount behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from dispo.config import Config, StorageBackend, StorageConfig, StoragePool

MKFS = {
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def sh(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check,
                          stdin=subprocess.DEVNULL)


def loop_devices_for(backing: Path) -> list[str]:
    out = sh("losetup", "-j", backing, check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


@contextlib.contextmanager
def loop_fs(where: Path, fstype: str = "btrfs", size: str = "1G") -> Iterator[Path]:
    """A fresh filesystem of `fstype` in a sparse file under `where`, loop-mounted at where/mnt."""
    backing = where / f"{fstype}.img"
    mnt = where / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    sh("truncate", "-s", size, backing)
    try:
        sh(*MKFS[fstype], backing)
        sh("mount", "-o", "loop", backing, mnt)
        yield mnt
    finally:
        release_mounts_under(mnt)  # a workspace's storage pool inside it, say
        if is_mounted(mnt) and sh("umount", mnt, check=False).returncode != 0:
            sh("umount", "-l", mnt, check=False)
        for dev in loop_devices_for(backing):
            sh("losetup", "-d", dev, check=False)
        backing.unlink(missing_ok=True)


def release_mounts_under(root: Path) -> None:
    """Unmount everything mounted beneath root (deepest first) and detach loop devices on files beneath it."""
    top = os.path.realpath(root) + "/"
    with open("/proc/mounts") as f:
        targets = [line.split()[1] for line in f if line.split()[1].startswith(top)]
    for target in sorted(targets, key=len, reverse=True):
        if sh("umount", target, check=False).returncode != 0:
            sh("umount", "-l", target, check=False)
    out = sh("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", check=False).stdout
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().startswith(top):
            sh("losetup", "-d", name, check=False)


def loop_devices_under(root: Path) -> list[str]:
    top = os.path.realpath(root) + "/"
    out = sh("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", check=False).stdout
    return [line for line in out.splitlines() if line.strip().partition(" ")[2].strip().startswith(top)]


def make_ext4(path: Path, size: str = "32M", files: dict[str, str] | None = None) -> Path:
    """A real ext4 image made without a mount (mkfs.ext4 -d)."""
    root = path.with_suffix(".root")
    root.mkdir()
    for rel, text in (files or {"etc/hostname": "test\n"}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    sh("mkfs.ext4", "-q", "-F", "-d", root, path, size)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def debugfs_write(image: Path, src: Path, dest: str) -> None:
    sh("debugfs", "-w", "-R", f"write {src} {dest}", image)


def debugfs_has(image: Path, path: str) -> bool:
    return "Inode:" in sh("debugfs", "-R", f"stat {path}", image, check=False).stdout


def make_config(workspace: Path, state_dir: Path, backend: StorageBackend = StorageBackend.AUTO,
                pool: StoragePool = StoragePool.NONE) -> Config:
    # No storage pool unless a test asks: a pool is a loop mount inside the test's tmp dir (tests/test_pool.py).
    return Config(workspace=workspace, state_dir=state_dir, storage=StorageConfig(backend=backend, pool=pool))


def dispo_env(workspace: Path, state_dir: Path) -> dict[str, str]:
    return dict(os.environ, DISPO_WORKSPACE=str(workspace), DISPO_STATE_DIR=str(state_dir), DISPO_CONFIG="")


def host_objects(workspace: Path, state_dir: Path) -> dict[str, set[str]]:
    """An independent listing of what dispo may leave behind, for before/after comparisons."""
    disks = workspace / "sessions"
    images = workspace / "images"
    sessions = state_dir / "sessions"
    subvols: set[str] = set()
    if workspace.exists() and sh("stat", "-f", "-c", "%T", workspace).stdout.strip() == "btrfs":
        out = sh("btrfs", "subvolume", "list", "-o", workspace, check=False).stdout
        subvols = {line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line}
    return {
        "session_disks": {p.name for p in disks.iterdir()} if disks.exists() else set(),
        "image_entries": {p.name for p in images.iterdir()} if images.exists() else set(),
        "journals": {p.name for p in sessions.iterdir()} if sessions.exists() else set(),
        "subvolumes": subvols,
    }
