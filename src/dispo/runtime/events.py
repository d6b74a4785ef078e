"""What the runtime tells the world: events to a sink. Only the CLI prints them; the service streams them.

An event is a kind, the session it is about, a one-line message for people and fields for programs. It is
JSON-serialisable (`to_json` / `from_json`) so the same event reaches `dispo run` in-process and through
dispod's event stream, and the CLI prints both the same way.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)


class EventKind(StrEnum):
    STEP = "step"        # a bring-up step finished: fields step, seconds
    NOTICE = "notice"    # something a person should know (the guest runs under TCG, ...)
    READY = "ready"      # the guest answers: fields address, backend, accel, ready_s
    VIEWER = "viewer"    # the web viewer serves the display: fields url
    OUTPUT = "output"    # the command's output (captured mode): fields stream (stdout|stderr), data (base64)
    STATE = "state"      # the session's state changed: fields state, and exit_status/end_reason once known
    ENDED = "ended"      # everything is removed: fields exit_status, end_reason, end_kind, error (problem) or None


class EndKind(StrEnum):
    """How a session ended, for programs (a page maps it to its own words; end_reason is the one line for the
    log). Who asks a session to stop says which (LiveSession.stop); the rest the session knows itself."""
    USER = "user"                        # asked through the API (DELETE: the dashboard, `dispo stop`, a client)
    VIEWER = "viewer"                    # "End session" in its viewer
    IDLE = "idle"                        # its idle timeout
    LIFETIME = "lifetime"                # its maximum lifetime
    EXITED = "exited"                    # its app or command exited (exit_status says how)
    FINISHED = "finished"                # its steps ended it (a template build, once saved)
    DISPOD_STOPPED = "dispod_stopped"    # dispod stopped (SIGTERM) and ended every session
    INTERRUPTED = "interrupted"          # the `dispo run` that owned it got SIGINT or SIGTERM
    POOL = "pool"                        # a warm-pool guest, drained or replaced before anyone took it
    FAILED = "failed"                    # an error (status `error` says which)
    RECLAIMED = "reclaimed"              # its owner died; the next dispod (or `dispo gc`) tore it down
    NODE_LOST = "node_lost"              # a cluster's gateway lost the session's node (dispo/cluster/gateway.py)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    session_id: str
    message: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "session_id": self.session_id, "message": self.message,
                "fields": dict(self.fields), "time": self.time}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        return cls(EventKind(str(data["kind"])), str(data["session_id"]), str(data.get("message", "")),
                   dict(data.get("fields") or {}), float(data.get("time", 0.0)))


EventSink = Callable[[Event], None]


def encode_output(data: bytes) -> str:
    """An OUTPUT event's `data` field: the bytes as base64 (the command's output need not be text)."""
    return base64.b64encode(data).decode()


class Fanout:
    """One sink that hands each event to every subscriber; a failing subscriber is logged, not fatal."""

    def __init__(self) -> None:
        self._sinks: list[EventSink] = []
        self._lock = threading.Lock()

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        with self._lock:
            self._sinks.append(sink)

        def unsubscribe() -> None:
            with self._lock:
                if sink in self._sinks:
                    self._sinks.remove(sink)

        return unsubscribe

    def __call__(self, event: Event) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink(event)
            except Exception:  # an observer's bug must not end a session
                log.exception("event sink failed on %s", event.kind)
