"""Writing into a directory tree that came from outside (an image's root filesystem, a fetched squashfs) as
root, without ever following its links.

An image tree is hostile input: `etc` may be a link to the host's /etc, `root` a link to /anything. Every
operation here walks from the tree's root with descriptors opened O_NOFOLLOW|O_DIRECTORY, one component at a
time, and makes files with O_EXCL|O_NOFOLLOW, so nothing dispo writes, renames or removes can land outside
the tree. A link where dispo needs a directory is refused with one line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from dispo.errors import StorageError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(rel: str) -> list[str]:
    parts = [p for p in PurePosixPath(rel.lstrip("/")).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        raise StorageError(f"invalid path {rel!r} inside an image tree")
    return parts


@contextlib.contextmanager
def open_dir(root: Path, rel: str = "", *, create: bool = False, mode: int = 0o755) -> Iterator[int]:
    """A descriptor of root/rel, reached without following any link (created with `mode` when missing and
    `create`). StorageError if a component is a link or not a directory."""
    fd = os.open(root, _DIR)
    try:
        for name in (_parts(rel) if rel.strip("/") else []):
            try:
                nxt = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, mode, dir_fd=fd)
                nxt = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:  # ELOOP (a link) or ENOTDIR
                raise StorageError(f"{root}/{rel}: {name!r} is a link or not a directory ({e.strerror})",
                                   hint="the image's tree is not as dispo expects; use another image") from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def write_file(root: Path, rel: str, data: bytes, mode: int = 0o644, *, dir_mode: int = 0o755) -> None:
    """root/rel holds `data` (mode `mode`): whatever stood at that name, a link included, is replaced."""
    *dirs, name = _parts(rel)
    with open_dir(root, "/".join(dirs), create=True, mode=dir_mode) as d:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=d)  # a link is removed, never followed
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=d)
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove(root: Path, rel: str) -> None:
    """Remove root/rel (a file or a link; a missing one is fine)."""
    *dirs, name = _parts(rel)
    with contextlib.suppress(FileNotFoundError), open_dir(root, "/".join(dirs)) as d:
        os.unlink(name, dir_fd=d)


def rename(root: Path, rel: str, new_name: str) -> bool:
    """Rename root/rel to new_name in the same directory (rename never follows links); False if absent."""
    *dirs, name = _parts(rel)
    with open_dir(root, "/".join(dirs)) as d:
        try:
            os.rename(name, new_name, src_dir_fd=d, dst_dir_fd=d)
        except FileNotFoundError:
            return False
    return True


def exists(root: Path, rel: str) -> bool:
    *dirs, name = _parts(rel)
    try:
        with open_dir(root, "/".join(dirs)) as d:
            os.stat(name, dir_fd=d, follow_symlinks=False)
            return True
    except (FileNotFoundError, StorageError):
        return False


_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


def unmount(path: Path) -> None:
    """Detach the mount at `path` without following a link there (something may have swapped the directory
    for a link to a host path while the tree was in use); nothing mounted there is fine."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise StorageError(f"cannot unmount {path}: {os.strerror(err)}")
