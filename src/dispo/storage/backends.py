"""The three ways to give a session a private disk, behind one small interface.

A backend stores an image in a *holder* directory (images/<name>/) and makes a session's private copy of
that holder (sessions/<id>/). Adding a backend means one class here and one StorageBackend value.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
from pathlib import Path
from typing import ClassVar

from dispo.config import StorageBackend
from dispo.errors import CommandError, StorageError
from dispo.infra.proc import run
from dispo.storage import files

log = logging.getLogger(__name__)

BTRFS_HINT = "install btrfs-progs"


class DiskBackend(abc.ABC):
    kind: ClassVar[StorageBackend]
    #: journal kind that undoes a holder made by make_holder/clone
    undo_kind: ClassVar[str]

    @abc.abstractmethod
    def make_holder(self, path: Path) -> None:
        """Create the empty directory (or subvolume) an image is assembled in."""

    @abc.abstractmethod
    def put_file(self, src: Path, dst: Path, progress: files.Progress | None = None) -> None:
        """Bring an outside file into a holder, as cheaply as the filesystem allows."""

    @abc.abstractmethod
    def seal(self, path: Path) -> None:
        """Make a finished image read-only."""

    @abc.abstractmethod
    def clone(self, image_dir: Path, dest: Path, only: tuple[str, ...] | None = None) -> None:
        """Make dest a private, writable copy of the image holder (with `only`: of those files in it)."""


def fs_type(path: Path) -> str:
    """'btrfs', 'xfs', 'ext2/ext3', 'tmpfs', ... for the filesystem holding path."""
    return run(["stat", "-f", "-c", "%T", path]).stdout.strip()


def is_subvolume(path: Path) -> bool:
    # On btrfs every subvolume root has inode number 256.
    try:
        return path.is_dir() and path.stat().st_ino == 256 and fs_type(path) == "btrfs"
    except OSError:
        return False


class BtrfsBackend(DiskBackend):
    """Image = read-only subvolume; session disk = writable snapshot of it. O(1) in the image size."""

    kind = StorageBackend.BTRFS
    undo_kind = "btrfs-subvolume"

    def make_holder(self, path: Path) -> None:
        run(["btrfs", "subvolume", "create", path], hint=BTRFS_HINT)

    def put_file(self, src: Path, dst: Path, progress: files.Progress | None = None) -> None:
        try:
            files.reflink(src, dst)  # same filesystem: instant
        except OSError:
            dst.unlink(missing_ok=True)
            files.sparse_copy(src, dst, progress)

    def seal(self, path: Path) -> None:
        run(["btrfs", "property", "set", "-ts", path, "ro", "true"], hint=BTRFS_HINT)

    def clone(self, image_dir: Path, dest: Path, only: tuple[str, ...] | None = None) -> None:
        run(["btrfs", "subvolume", "snapshot", image_dir, dest], hint=BTRFS_HINT)
        # A snapshot keeps the image's modes (0755 holder, 0444 files): a live session's disk is private,
        # as with the other backends.
        dest.chmod(0o700)
        for f in dest.iterdir():
            if f.is_file() and not f.is_symlink():
                if only is not None and f.name not in only:
                    f.unlink()  # the snapshot has everything; a session keeps only what it uses
                else:
                    f.chmod(0o600)


class _FileCloneBackend(DiskBackend):
    """Image = plain directory with read-only files; session disk = a directory of per-file clones."""

    undo_kind = "path"

    def make_holder(self, path: Path) -> None:
        path.mkdir(mode=0o755)

    def seal(self, path: Path) -> None:
        # Drop the write bits only: a private key imported 0600 stays unreadable to others (0400).
        for f in path.iterdir():
            f.chmod(f.stat().st_mode & 0o555)

    def clone(self, image_dir: Path, dest: Path, only: tuple[str, ...] | None = None) -> None:
        dest.mkdir(mode=0o700)
        for f in sorted(image_dir.iterdir()):
            if f.is_file() and (only is None or f.name in only):
                self.clone_file(f, dest / f.name)
                (dest / f.name).chmod(0o600)

    def put_file(self, src: Path, dst: Path, progress: files.Progress | None = None) -> None:
        files.require_free(dst.parent, files.allocated_bytes(src), f"a copy of {src.name}")
        files.sparse_copy(src, dst, progress)

    @abc.abstractmethod
    def clone_file(self, src: Path, dst: Path) -> None:
        """Make dst a private copy of src."""


class ReflinkBackend(_FileCloneBackend):
    kind = StorageBackend.REFLINK

    def put_file(self, src: Path, dst: Path, progress: files.Progress | None = None) -> None:
        try:
            files.reflink(src, dst)
        except OSError:
            dst.unlink(missing_ok=True)
            super().put_file(src, dst, progress)

    def clone_file(self, src: Path, dst: Path) -> None:
        try:
            files.reflink(src, dst)
        except OSError as e:
            raise StorageError(
                f"reflink copy of {src} failed: {e.strerror}",
                hint="the workspace filesystem lost reflink support; set storage.backend = 'copy'",
            ) from None


class CopyBackend(_FileCloneBackend):
    kind = StorageBackend.COPY
    warned: ClassVar[bool] = False

    def clone(self, image_dir: Path, dest: Path, only: tuple[str, ...] | None = None) -> None:
        if not CopyBackend.warned:
            log.warning("workspace has neither btrfs snapshots nor reflinks: each session copies its image, "
                        "which costs time proportional to the image size (put the workspace on btrfs or XFS "
                        "for instant disks)")
            CopyBackend.warned = True
        super().clone(image_dir, dest, only)

    def clone_file(self, src: Path, dst: Path) -> None:
        files.require_free(dst.parent, files.allocated_bytes(src), f"a session copy of {src.name}")
        files.sparse_copy(src, dst)


BACKENDS: dict[StorageBackend, type[DiskBackend]] = {
    StorageBackend.BTRFS: BtrfsBackend,
    StorageBackend.REFLINK: ReflinkBackend,
    StorageBackend.COPY: CopyBackend,
}


def backend(kind: StorageBackend) -> DiskBackend:
    return BACKENDS[kind]()


def probe(workspace: Path) -> StorageBackend:
    """The best backend the workspace's filesystem supports."""
    if fs_type(workspace) == "btrfs" and shutil.which("btrfs"):
        return StorageBackend.BTRFS
    if files.supports_reflink(workspace):
        return StorageBackend.REFLINK
    return StorageBackend.COPY


def check_forced(kind: StorageBackend, workspace: Path) -> None:
    """A backend forced in the config must work on this workspace; say so now, not halfway."""
    if kind is StorageBackend.BTRFS and fs_type(workspace) != "btrfs":
        raise StorageError(f"storage.backend is 'btrfs' but {workspace} is not on btrfs",
                           hint="put the workspace on btrfs or set storage.backend = 'auto'")
    if kind is StorageBackend.REFLINK and not files.supports_reflink(workspace):
        raise StorageError(f"storage.backend is 'reflink' but {workspace} does not support reflinks",
                           hint="use btrfs or XFS (mkfs.xfs -m reflink=1), or set storage.backend = 'auto'")


def remove_tree(path: Path) -> None:
    """Remove a holder made by any backend: a subvolume (read-only or not) or a plain directory."""
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        # Never through a link: `btrfs subvolume delete` (and rmtree's caller) would act on its target, which
        # may be an image or anything else on the host.
        path.unlink()
        return
    if is_subvolume(path):
        # A read-only subvolume must be made writable first, or its deletion fails on older kernels.
        run(["btrfs", "property", "set", "-ts", path, "ro", "false"], check=False)
        try:
            run(["btrfs", "subvolume", "delete", path], hint=BTRFS_HINT)
        except CommandError as e:
            raise StorageError(f"cannot delete subvolume {path}: {e.stderr.strip()}") from e
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()

