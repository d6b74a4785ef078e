"""Child processes a session owns (VMMs, proxies): identity that survives pid reuse, and stopping them.

A process is recorded in the journal as (pid, starttime); `starttime` is field 22 of /proc/PID/stat, so
`dispo gc` never kills an unrelated process that happens to reuse the pid of a dead session's VMM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping

from dispo.errors import DispoError
from dispo.undo import undoer


def starttime(pid: int) -> str | None:
    """Start time of pid in clock ticks since boot, or None if there is no such process."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def is_same_process(pid: int, start: str) -> bool:
    now = starttime(pid)
    if now is None:
        return False
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
    return now == start and state != "Z"


def wait_gone(pid: int, start: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
        if not is_same_process(pid, start):
            return True
        time.sleep(0.02)
    return not is_same_process(pid, start)


def terminate(pid: int, start: str, *, term_timeout: float = 5.0, kill_timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, each with a deadline; raises if the process is still there after both."""
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        if not is_same_process(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, start, timeout):
            return
    raise DispoError(f"process {pid} survived SIGKILL", hint="check for a process stuck in the kernel (D state)")


@undoer("process")
def undo_process(args: Mapping[str, str]) -> None:
    terminate(int(args["pid"]), args["starttime"], term_timeout=float(args.get("term_timeout", "3")))
