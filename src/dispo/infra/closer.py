"""Close things in the background: some closes wait for the kernel to finish with what the object held.

Closing an nf_tables netlink socket first frees whatever earlier transactions deleted, after an RCU grace period;
closing an inotify instance waits for its watches to be torn down (an SRCU grace period). Each costs 5-20 ms on a
loaded host, on a path (a session's start or end) that has no use for the wait. `close_behind` hands the close
to one thread of the process and returns at once.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

_closing: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def close_behind(close: Callable[[], object]) -> None:
    """Run `close` on the closer thread (started on first use: starting a thread per close costs
    milliseconds on a loaded host) and return at once. Errors of `close` (OSError) are dropped."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="close-behind", daemon=True)
            _thread.start()
    _closing.put(close)


def _loop() -> None:
    while True:
        close = _closing.get()
        with contextlib.suppress(OSError):
            close()
