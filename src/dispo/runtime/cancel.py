"""How a session is asked to stop: a cancel token, set once with the first reason.

The session (runtime/live.py) owns it; its steps (runtime/steps.py) check it between and inside their waits,
and its guest commands (runtime/guestio.py) refuse to start once it is set. No exception is raised into the
session from outside: stopping is this flag, looked at where it is safe to stop.
"""

from __future__ import annotations

import threading

from dispo.errors import Cancelled
from dispo.runtime.events import EndKind


class CancelToken:
    """Set once, with the first reason; waits wake at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.kind = EndKind.USER

    def set(self, reason: str, kind: EndKind = EndKind.USER) -> bool:
        if self._event.is_set():
            return False
        self.reason, self.kind = reason, kind
        self._event.set()
        return True

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)
