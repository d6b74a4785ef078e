"""The session runtime: the one thing the CLI and dispod call to run sessions.

    rt = Runtime(cfg)                        # machinery=REAL, viewers=StandaloneViewers() or dispod's
    live = rt.start(request.build(cfg, profile="chromium", url=URL))
    live.wait(); live.exit_status, live.end_reason
    rt.stop(live.id, "reason")               # or live.stop(reason); rt.shutdown(reason) ends them all

The runtime prints nothing: it emits `Event`s to `rt.events` (subscribe a sink) and to the per-session
sink given to `start`. Each session runs on its own thread and holds its own journal lock.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator

from dispo import gc
from dispo.config import Config
from dispo.errors import Busy, NotFound
from dispo.names import check_session_id, new_session_id
from dispo.runtime import warm
from dispo.runtime.app import StandaloneViewers, ViewerHost
from dispo.runtime.events import Event, EventKind, EventSink, Fanout
from dispo.runtime.live import LiveSession, SessionState, join_all
from dispo.runtime.machinery import REAL, Machinery
from dispo.runtime.pool import Pool
from dispo.runtime.request import SessionRequest, Stdio, build, from_json
from dispo.runtime.steps import STEPS, Step

__all__ = [
    "STEPS",
    "Event",
    "EventKind",
    "EventSink",
    "LiveSession",
    "Machinery",
    "Runtime",
    "SessionRequest",
    "SessionState",
    "StandaloneViewers",
    "Stdio",
    "Step",
    "ViewerHost",
    "build",
    "from_json",
]

log = logging.getLogger(__name__)

KEEP_ENDED = 100  # ended sessions kept for GET /v1/sessions/{id} (exit status, end reason)


class Runtime:
    def __init__(self, cfg: Config, *, machinery: Machinery = REAL, viewers: ViewerHost | None = None,
                 max_sessions: int = 0, owner: str = "dispo") -> None:
        self.cfg = cfg
        self.machinery = machinery
        self.viewers = viewers
        self.max_sessions = max_sessions
        self.owner = owner
        self.events = Fanout()
        self._live: dict[str, LiveSession] = {}
        self._ended: collections.OrderedDict[str, LiveSession] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.pool: Pool | None = None  # dispod's warm pool (runtime/pool.py), when it keeps one

    def start(self, request: SessionRequest, *, steps: tuple[Step, ...] | None = None,
              sink: EventSink | None = None, pooled: str = "") -> LiveSession:
        """Begin a session (returns at once, state `starting`); Busy past max_sessions. Without `steps`, the
        session is a guest from the warm pool when one waits, else restores from a current template that fits,
        else boots (runtime/warm.py says which and why). `pooled`: a guest for the pool (runtime/pool.py)."""
        how = ""
        if steps is None:
            self._check_room()
            if self.pool is not None and (live := self.pool.acquire(request, sink)) is not None:
                return self._handed_out(live)
            chosen = warm.plan(self.cfg, request)
            steps, how = chosen.steps, chosen.why
        with self._lock:
            if not pooled:
                self._check_room_locked()
            sid = new_session_id()
            while sid in self._live or sid in self._ended:
                sid = new_session_id()
            live = LiveSession(self, request, sid, steps=steps, sink=sink)
            live.pool_name = pooled
            self._live[sid] = live
        if self.viewers is not None and request.display.value == "web" and not pooled:
            live.viewer_url = self.viewers.reserve(live)
        live.emit(EventKind.STATE, "starting", **live.status())
        if how:
            live.warm, live.start_reason = how.startswith("restoring"), how
            live.emit(EventKind.NOTICE, how, start="restore" if live.warm else "boot")
        live.start()
        return live

    def _check_room(self) -> None:
        with self._lock:
            self._check_room_locked()

    def _check_room_locked(self) -> None:
        users = sum(1 for s in self._live.values() if not s.pool_name)
        if self.max_sessions and users >= self.max_sessions:
            raise Busy(f"{users} session{'s are' if users != 1 else ' is'} running, the most this service allows "
                       f"(max_sessions = {self.max_sessions})")

    def _handed_out(self, live: LiveSession) -> LiveSession:
        """A pooled guest just claimed by a request: it is now that request's session."""
        if self.viewers is not None and live.request.display.value == "web":
            live.viewer_url = self.viewers.reserve(live)
        live.warm = True
        live.start_reason = f"handed a guest from the warm pool (restored from template {live.template}, never used)"
        live.emit(EventKind.STATE, "starting", **live.status())
        live.emit(EventKind.NOTICE, live.start_reason, start="pool", template=live.template)
        return live

    def get(self, session_id: str) -> LiveSession:
        check_session_id(session_id)
        with self._lock:
            live = self._live.get(session_id) or self._ended.get(session_id)
        if live is None:
            raise NotFound(f"no session {session_id}", hint="list sessions with 'dispo ls' or GET /v1/sessions")
        return live

    def sessions(self, *, ended: bool = False, pooled: bool = False) -> list[LiveSession]:
        """The sessions (with `ended`, the recently ended too; with `pooled`, the guests waiting in the pool)."""
        with self._lock:
            found = list(self._live.values()) + (list(self._ended.values()) if ended else [])
        return sorted((s for s in found if pooled or not s.pool_name), key=lambda s: s.created)

    def __iter__(self) -> Iterator[LiveSession]:
        return iter(self.sessions())

    def stop(self, session_id: str, reason: str) -> LiveSession:
        live = self.get(session_id)
        live.stop(reason)
        return live

    def shutdown(self, reason: str, timeout: float = 60.0) -> list[LiveSession]:
        """Stop every session and wait for their teardown; the ones still there after `timeout`."""
        if self.pool is not None:
            self.pool.close()
        sessions = self.sessions(pooled=True)
        for s in sessions:
            s.stop(reason)
        return join_all(sessions, timeout)

    def forget(self, live: LiveSession) -> None:
        """Called by a session when it ended: keep it for a while for its exit status and end reason."""
        with self._lock:
            self._live.pop(live.id, None)
            self._ended[live.id] = live
            while len(self._ended) > KEEP_ENDED:
                self._ended.popitem(last=False)

    def reclaim(self) -> gc.Report:
        """Undo what sessions of dead owners left (a dispod or dispo killed with -9): `dispo gc`'s work."""
        report = gc.collect(self.cfg)
        for sid in report.reclaimed:
            log.info("reclaimed session %s (its owner died)", sid)
        return report

    @property
    def live_count(self) -> int:
        with self._lock:
            return sum(1 for s in self._live.values() if s.state is not SessionState.ENDED and not s.pool_name)
