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
    """Set once, with the first reason; waits wake at once. A wait also wakes, without the token being set, when
    something it watches over happened (`nudge`: the session's command ended), so the watcher looks at once
    instead of at its next poll."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._set = False
        self._nudged = False
        self.reason = ""
        self.kind = EndKind.USER

    def set(self, reason: str, kind: EndKind = EndKind.USER) -> bool:
        with self._cond:
            if self._set:
                return False
            self.reason, self.kind = reason, kind
            self._set = True
            self._cond.notify_all()
        return True

    def nudge(self) -> None:
        """Wake the waits now (the token stays as it is)."""
        with self._cond:
            self._nudged = True
            self._cond.notify_all()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Whether the token is set, after at most `timeout` seconds, or sooner when set or nudged."""
        with self._cond:
            if not self._set and not self._nudged:
                self._cond.wait(timeout)
            self._nudged = False
            return self._set

    def check(self) -> None:
        if self._set:
            raise Cancelled(self.reason)
