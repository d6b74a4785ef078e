"""Wait for a file to appear, or for the process that should make it to exit, on kernel events (inotify and a
pidfd) instead of a sleep-and-look loop: the caller wakes when the file is made, not up to a polling interval
later, and burns nothing meanwhile."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import time
from pathlib import Path

from dispo.infra.closer import close_behind

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class ProcessExited(Exception):
    """The process exited before the file appeared."""


def wait_for_file(path: Path, pid: int, timeout: float) -> None:
    """Return once `path` exists. Raises ProcessExited when process `pid` (a child of ours) ends first, and
    TimeoutError after `timeout` seconds."""
    ino = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if ino < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    pidfd = -1
    try:
        # The watch first, then the look: a file made in between is seen by one or the other.
        if _libc.inotify_add_watch(ino, os.fsencode(path.parent), IN_CREATE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path.parent}")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1  # already gone (and reaped): the look below decides
        poller = select.poll()
        poller.register(ino, select.POLLIN)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            if path.exists():
                return
            if pidfd < 0:
                raise ProcessExited
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path} did not appear within {timeout} s")
            for fd, _ in poller.poll(left * 1000):
                if fd == pidfd and not path.exists():
                    raise ProcessExited
                if fd == ino:
                    _drain(ino)
    finally:
        # Closing an inotify instance waits for its watch to be torn down (an SRCU grace period, 5-15 ms
        # here): the caller has what it waited for, so that wait is done on the closer thread.
        close_behind(lambda: os.close(ino))
        if pidfd >= 0:
            os.close(pidfd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno != errno.EAGAIN:
            raise
