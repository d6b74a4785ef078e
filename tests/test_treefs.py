"""Root writing into a tree that came from outside (an image's root filesystem, a fetched squashfs): links in
the tree are never followed, so nothing lands outside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispo.errors import StorageError
from dispo.storage import treefs


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    tree, outside = tmp_path / "tree", tmp_path / "host-etc"
    tree.mkdir()
    outside.mkdir()
    (outside / "resolv.conf").write_text("the host's own\n")
    return tree, outside


def test_a_linked_directory_is_refused(world: tuple[Path, Path]) -> None:
    tree, outside = world
    (tree / "etc").symlink_to(outside)  # the image says: etc -> the host's /etc
    with pytest.raises(StorageError, match="is a link or not a directory"):
        treefs.write_file(tree, "etc/resolv.conf", b"nameserver 192.0.2.1\n")
    with pytest.raises(StorageError):
        treefs.rename(tree, "etc/resolv.conf", ".saved")
    assert (outside / "resolv.conf").read_text() == "the host's own\n"
    assert sorted(p.name for p in outside.iterdir()) == ["resolv.conf"]


def test_a_linked_file_is_replaced_not_followed(world: tuple[Path, Path]) -> None:
    tree, outside = world
    (tree / "etc").mkdir()
    (tree / "etc" / "resolv.conf").symlink_to(outside / "resolv.conf")
    treefs.write_file(tree, "etc/resolv.conf", b"nameserver 192.0.2.1\n", 0o600)
    written = tree / "etc" / "resolv.conf"
    assert not written.is_symlink() and written.read_bytes() == b"nameserver 192.0.2.1\n"
    assert written.stat().st_mode & 0o777 == 0o600
    assert (outside / "resolv.conf").read_text() == "the host's own\n"
    treefs.remove(tree, "etc/resolv.conf")
    assert not os.path.lexists(written)


def test_paths_cannot_climb_out(world: tuple[Path, Path]) -> None:
    tree, _ = world
    for bad in ("../escape", "etc/../../escape", ""):
        with pytest.raises(StorageError):
            treefs.write_file(tree, bad, b"x")


def test_a_fetched_root_filesystem_with_root_linked_elsewhere_is_refused(tmp_path: Path) -> None:
    """`dispo image fetch` authorizes its key in the unpacked tree's /root: a squashfs whose `root` is a link
    (to the host's /root, say) must not make dispo write the host's authorized_keys."""
    import shutil
    import subprocess

    if shutil.which("mksquashfs") is None:
        pytest.skip("needs squashfs-tools")
    from dispo.fetch import squashfs_to_ext4

    src, outside = tmp_path / "src", tmp_path / "host-root"
    (src / "etc").mkdir(parents=True)
    outside.mkdir()
    (src / "root").symlink_to(outside)
    sq = tmp_path / "rootfs.squashfs"
    subprocess.run(["mksquashfs", str(src), str(sq), "-quiet", "-noappend"], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(StorageError, match="'root' is a link"):
        squashfs_to_ext4(sq, tmp_path / "out.ext4", "ssh-ed25519 AAAA test\n", work)
    assert list(outside.iterdir()) == []
