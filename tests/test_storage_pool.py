"""The workspace's btrfs pool (storage/pool.py): on an ext4 workspace with the default settings, images and
session disks live in a sparse, loop-mounted btrfs file, so a session's disk is a snapshot, not a copy."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo import gc, verify
from dispo.config import Config, StorageBackend, StorageConfig, StoragePool
from dispo.storage import backends, pool
from dispo.storage.disks import open_session
from dispo.storage.images import ImageStore
from tests.worlds import is_mounted, loop_devices_under, loop_fs, make_config, release_mounts_under, sh, sha256

pytestmark = pytest.mark.root

COPY_WARNING = "each session copies its image"


@pytest.fixture
def ext4_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A workspace on a fresh ext4; whatever the test leaves mounted in it is released, and checked released."""
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount filesystems")
    monkeypatch.setattr(backends.CopyBackend, "warned", False)  # the copy warning is said once per process
    monkeypatch.setattr(pool, "_said", set())
    with loop_fs(tmp_path / "ext4", "ext4", "1G") as mnt:
        try:
            yield mnt / "dispo"
        finally:
            release_mounts_under(mnt)
            assert loop_devices_under(mnt) == []
            assert not is_mounted(mnt / "dispo" / pool.MOUNT)


def defaults(ws: Path, tmp_path: Path) -> Config:
    """The built-in defaults, only the paths moved (what a new user on an ext4 root has)."""
    cfg = Config(workspace=ws, state_dir=tmp_path / "state")
    assert cfg.storage == StorageConfig()
    assert cfg.storage.backend is StorageBackend.AUTO and cfg.storage.pool is StoragePool.LOOP_BTRFS
    return cfg


def test_default_ext4_workspace_snapshots_in_its_pool(ext4_ws: Path, tmp_path: Path, src_image: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg = defaults(ext4_ws, tmp_path)
    with caplog.at_level(logging.WARNING):
        image = ImageStore(cfg).import_(src_image, "base", quiet=True)
        assert image.storage is StorageBackend.BTRFS
        assert backends.fs_type(ext4_ws / "pool") == "btrfs" and backends.fs_type(ext4_ws) == "ext2/ext3"
        assert (ext4_ws / "images").is_symlink() and (ext4_ws / "sessions").is_symlink()
        for _ in range(2):
            with open_session(cfg, image="base") as s:
                assert sh("btrfs", "subvolume", "show", s.disk_dir, check=False).returncode == 0
                assert backends.is_subvolume(s.disk_dir)
                with open(s.disk, "r+b") as f:  # a session writes its disk, never the image
                    f.write(b"\xff" * 4096)
    assert COPY_WARNING not in caplog.text
    assert caplog.text.count("made a btrfs storage pool") == 1
    # The image is still sealed and unchanged.
    assert sh("btrfs", "property", "get", "-ts", image.path, "ro").stdout.strip() == "ro=true"
    assert sha256(image.rootfs) == image.sha256 and ImageStore(cfg).verify("base")

    # A reboot: the mount is gone (its loop device with it). The next use mounts it again.
    sh("umount", ext4_ws / "pool")
    assert not pool.mounted(cfg)
    assert [i.name for i in ImageStore(cfg).list()] == ["base"]
    sh("umount", ext4_ws / "pool")
    with open_session(cfg, image="base") as s:
        assert backends.is_subvolume(s.disk_dir)
    assert pool.mounted(cfg)
    assert len(loop_devices_under(ext4_ws)) == 1

    # The pool, its mount and its loop device are the workspace's own: nothing to collect.
    assert verify.scan(cfg, network=False).orphans == []
    report = gc.collect(cfg)
    assert report.orphans == [] and report.failed == []
    assert pool.mounted(cfg) and ImageStore(cfg).verify("base")


def test_images_of_the_copy_layout_move_into_the_pool(ext4_ws: Path, tmp_path: Path, src_image: Path) -> None:
    old = make_config(ext4_ws, tmp_path / "state", pool=StoragePool.NONE)
    before = ImageStore(old).import_(src_image, "base", quiet=True)
    assert before.storage is StorageBackend.COPY and not (ext4_ws / pool.FILE).exists()
    cfg = defaults(ext4_ws, tmp_path)
    with open_session(cfg, image="base") as s:
        assert backends.is_subvolume(s.disk_dir)
    after = ImageStore(cfg).get("base")
    assert after.storage is StorageBackend.BTRFS and after.sha256 == before.sha256 == sha256(after.rootfs)
    assert backends.is_subvolume(after.path) and not (ext4_ws / ".old-images").exists()


def test_pool_none_keeps_copying_with_the_warning(ext4_ws: Path, tmp_path: Path, src_image: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(ext4_ws, tmp_path / "state", pool=StoragePool.NONE)
    with caplog.at_level(logging.WARNING):
        ImageStore(cfg).import_(src_image, "base", quiet=True)
        with open_session(cfg, image="base") as s:
            assert not backends.is_subvolume(s.disk_dir)
    assert COPY_WARNING in caplog.text and "pool" not in caplog.text
    assert not (ext4_ws / pool.FILE).exists() and not (ext4_ws / "images").is_symlink()


def test_no_pool_without_mkfs_says_why_and_copies(ext4_ws: Path, tmp_path: Path, src_image: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # mkfs.btrfs that fails after the pool file exists: the file goes, the session copies, one line says why.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mkfs.btrfs").write_text("#!/bin/sh\necho 'mkfs.btrfs: no space for you' >&2\nexit 1\n")
    (fake / "mkfs.btrfs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    cfg = defaults(ext4_ws, tmp_path)
    with caplog.at_level(logging.WARNING):
        image = ImageStore(cfg).import_(src_image, "base", quiet=True)
    assert image.storage is StorageBackend.COPY
    assert "no btrfs storage pool for the workspace: mkfs.btrfs failed" in caplog.text
    assert sorted(p.name for p in ext4_ws.iterdir() if "pool" in p.name) == [".pool.lock"]


def test_half_made_pool_is_found_and_collected(ext4_ws: Path, tmp_path: Path) -> None:
    """A pool file left by a dispo killed before it was renamed into place (its journal gone with a reboot)."""
    cfg = defaults(ext4_ws, tmp_path)
    ext4_ws.mkdir()
    half = ext4_ws / ".pool-0badc0de.btrfs"
    half.write_bytes(b"\0" * 4096)
    assert any("half-made storage pool" in o for o in verify.scan(cfg, network=False).orphans)
    report = gc.collect(cfg)
    assert str(half) in report.orphans and not half.exists()
    assert verify.scan(cfg, network=False).orphans == []
