"""`dispo run ... --downloads DIR`: copy each finished download of the session's browser into DIR on the host.

A thread asks the session for its downloads every second (in-process: runtime/guestio.py; through dispod: its
API) and copies each complete one it has not copied yet. DIR may belong to the user who ran dispo (through
sudo), so the copy never follows a link and never leaves DIR: DIR is opened once (O_DIRECTORY|O_NOFOLLOW),
every file is created relative to it with O_CREAT|O_EXCL|O_NOFOLLOW under a name made safe by
`guestio.host_name` (a name taken already gets " (N)" before its extension), written to a hidden temporary
name first and renamed when complete, and owned by DIR's owner. What it copied is reported as events.

The guest decides what is listed, so the copying is bounded per session by the profile ([downloads]
total_mib, total_files): past either it stops, saying so. A name is copied again when its size changes, at
most MAX_COPIES times. Its record of what it copied has an entry per name it tried, so it is bounded as well.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dispo.errors import DispoError, InvalidInput, TooLarge
from dispo.features import MIB, Features
from dispo.runtime.guestio import host_name

log = logging.getLogger(__name__)
POLL_S = 2.0
MAX_COPIES = 3  # copies of one name (a file that changes in the guest), whatever its sizes
_DEFAULT = Features()

Lister = Callable[[], list[dict[str, Any]]]               # [{"name", "size", "complete"}]
Opener = Callable[[str], AbstractContextManager[Iterator[bytes]]]


def open_directory(path: Path) -> int:
    """DIR as a directory descriptor; InvalidInput (at once, before the session starts) if it is not one."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(f"--downloads {path}: {e.strerror or e} (it must be an existing directory, not a link)",
                           hint="create the directory first (mkdir -p DIR)") from None


class DownloadSaver:
    def __init__(self, directory: Path, dir_fd: int, *, lister: Lister, opener: Opener, max_bytes: int,
                 on_saved: Callable[[str, str, int], None], on_error: Callable[[str], None],
                 total_bytes: int = _DEFAULT.downloads_total_mib * MIB,
                 total_files: int = _DEFAULT.downloads_total_files) -> None:
        self.directory = directory
        self._fd = dir_fd
        self._owner = os.fstat(dir_fd)
        self._list, self._open, self._max = lister, opener, max_bytes
        self._total_bytes, self._total_files = total_bytes, total_files
        self._on_saved, self._on_error = on_saved, on_error
        self._done: dict[str, tuple[int, int]] = {}  # name -> (copies tried, size of the last); <= total_files
        self._bytes = 0  # bytes of the copies tried (the sizes listed)
        self._tried = 0
        self.stopped = ""  # why it stopped copying (a quota), once it did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dispo-downloads", daemon=True)
        self.saved: list[str] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Copy what is complete one last time, then stop (called while the guest still runs)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _loop(self) -> None:
        while not self.stopped:
            stopping = self._stop.wait(POLL_S)
            try:
                self.poll()
            except DispoError as e:
                if not stopping:
                    log.debug("downloads: %s", e)
            if stopping:
                return

    def poll(self) -> None:
        if self.stopped:
            return
        for d in self._list():
            name, size = str(d.get("name", "")), int(d.get("size", 0))
            tried, last = self._done.get(name, (0, -1))
            if not d.get("complete") or size == last:
                continue
            if tried >= MAX_COPIES:
                if tried == MAX_COPIES:  # said once per name
                    self._done[name] = (tried + 1, last)
                    self._on_error(f"download {name[:80]!r} changed again: not copied (it was {MAX_COPIES} times)")
                continue
            if self._tried >= self._total_files:
                self._quota(f"{self._total_files} files, the profile's [downloads] total_files")
                return
            copied = size if size <= self._max else 0  # a file over max_mib is refused below, not copied
            if self._bytes + copied > self._total_bytes:
                self._quota(f"{self._total_bytes // MIB} MiB, the profile's [downloads] total_mib")
                return
            # Counted whatever happens: a failing file is reported, not retried.
            self._done[name] = (tried + 1, size)
            self._tried += 1
            self._bytes += copied
            try:
                if size > self._max:
                    raise TooLarge(f"{size} bytes, more than the profile's [downloads] max_mib")
                saved = self._save(name, size)
            except (DispoError, OSError) as e:
                self._on_error(f"download {name[:80]!r} not copied: {e}")
                continue
            self.saved.append(saved)
            self._on_saved(name, saved, size)

    def _quota(self, what: str) -> None:
        self.stopped = (f"--downloads stopped: this session's downloads reached {what}; later ones are not "
                        f"copied to {self.directory} (the viewer or the API still fetch them)")
        self._on_error(self.stopped)

    def _save(self, name: str, size: int) -> str:
        safe = host_name(name)
        tmp = f".dispo-{os.getpid()}-{threading.get_ident()}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._fd)
        try:
            written = 0
            with self._open(name) as chunks:
                for chunk in chunks:
                    written += len(chunk)
                    if written > size:
                        raise TooLarge("the download grew while it was copied")
                    os.write(fd, chunk)
            if written != size:
                raise DispoError(f"{written} of {size} bytes arrived")
            if os.geteuid() == 0:
                os.fchown(fd, self._owner.st_uid, self._owner.st_gid)
            os.fchmod(fd, 0o644)
            os.close(fd)
            fd = -1
            final = self._free_name(safe)
            os.rename(tmp, final, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            return final
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._fd)
            raise

    def _free_name(self, safe: str) -> str:
        stem, dot, ext = safe.rpartition(".")
        if not stem:
            stem, dot, ext = safe, "", ""
        candidate, n = safe, 1
        while True:
            try:
                os.stat(candidate, dir_fd=self._fd, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return candidate
                raise
            candidate = f"{stem} ({n}){dot}{ext}"
            n += 1
