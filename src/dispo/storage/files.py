"""File-level helpers: reflink, sparse copy with progress, hashing, free space, ext4 detection."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from dispo.errors import InvalidInput, StorageError
from dispo.names import format_size

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
_CHUNK = 64 << 20

Progress = Callable[[int, int], None]  # (done_bytes, total_bytes)


def reflink(src: Path, dst: Path) -> None:
    """Make dst share src's extents (btrfs, XFS). Raises OSError if the filesystem cannot."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())


def supports_reflink(directory: Path) -> bool:
    a, b = directory / ".dispo-reflink-probe-a", directory / ".dispo-reflink-probe-b"
    try:
        a.write_bytes(b"dispo" * 1024)
        reflink(a, b)
        return True
    except OSError:
        return False
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every data region; holes are skipped so sparse images stay sparse."""
    segments: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no more data
                break
            return [(0, size)]  # filesystem without SEEK_DATA: copy everything
        end = os.lseek(fd, start, os.SEEK_HOLE)
        segments.append((start, end - start))
        pos = end
    return segments


def sparse_copy(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Copy the bytes of src to a new dst, keeping holes. Real copies, never shared extents."""
    size = src.stat().st_size
    with open(src, "rb") as s, open(dst, "xb") as d:
        sfd, dfd = s.fileno(), d.fileno()
        segments = _data_segments(sfd, size)
        total = sum(n for _, n in segments)
        done = 0
        for start, length in segments:
            off, end = start, start + length
            while off < end:
                n = min(_CHUNK, end - off)
                # pread/pwrite, not copy_file_range: on btrfs/XFS the latter may share extents,
                # and the copy backend promises independent data.
                buf = os.pread(sfd, n, off)
                if not buf:
                    break
                os.pwrite(dfd, buf, off)
                off += len(buf)
                done += len(buf)
                if progress:
                    progress(done, total)
        os.ftruncate(dfd, size)


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def require_free(directory: Path, needed: int, what: str) -> None:
    free = free_bytes(directory)
    if free < needed:
        raise StorageError(
            f"not enough space in {directory} for {what}: {format_size(needed)} needed, {format_size(free)} free",
            hint="free some space, or set workspace to a larger filesystem",
        )


EXT_MAGIC = 0xEF53


def check_ext4(path: Path) -> None:
    """The file holds an ext2/3/4 filesystem (superblock magic at byte 1080)."""
    try:
        with open(path, "rb") as f:
            f.seek(1024 + 56)
            magic = int.from_bytes(f.read(2), "little")
    except IsADirectoryError:
        raise InvalidInput(f"{path} is a directory, not an ext4 image file",
                           hint="give the path of a raw ext4 filesystem image") from None
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}") from None
    if magic != EXT_MAGIC:
        raise InvalidInput(f"{path} is not an ext4 filesystem image",
                           hint="make one with 'mkfs.ext4 -d ROOTDIR FILE SIZE' or convert it first")
