"""The session runtime: the one thing the CLI and dispod call to run sessions.

    rt = Runtime(cfg)                        # machinery=REAL, viewers=None (web/viewers.py has the CLI's and dispod's)
    live = rt.start(request.build(cfg, profile="chromium", url=URL))
    live.wait(); live.exit_status, live.end_reason
    rt.stop(live.id, "reason")               # or live.stop(reason); rt.shutdown(reason) ends them all

The runtime prints nothing: it emits `Event`s to `rt.events` (subscribe a sink) and to the per-session
sink given to `start`. Each session runs on its own thread and holds its own journal lock.

The runtime imports nothing above it: whoever serves a web display is handed in (`viewers`, a `ViewerHost`),
so running a session never loads the web server.
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
from dispo.runtime import plan as planning
from dispo.runtime.app import check_socket_room
from dispo.runtime.events import EndKind, Event, EventKind, EventSink, Fanout
from dispo.runtime.live import AutomationHost, LiveSession, SessionState, ViewerHost, join_all
from dispo.runtime.machinery import REAL, Machinery
from dispo.runtime.plan import Origin, Plan
from dispo.runtime.pool import Pool
from dispo.runtime.record import with_recording
from dispo.runtime.request import SessionRequest, Stdio, build, from_json
from dispo.runtime.steps import BOOT, STEPS, Step, Steps

__all__ = [
    "BOOT",
    "STEPS",
    "AutomationHost",
    "EndKind",
    "Event",
    "EventKind",
    "EventSink",
    "LiveSession",
    "Machinery",
    "Origin",
    "Plan",
    "Runtime",
    "SessionRequest",
    "SessionState",
    "Stdio",
    "Step",
    "Steps",
    "ViewerHost",
    "build",
    "from_json",
]

log = logging.getLogger(__name__)

KEEP_ENDED = 100  # ended sessions kept for GET /v1/sessions/{id} (exit status, end reason)


class Runtime:
    def __init__(self, cfg: Config, *, machinery: Machinery = REAL, viewers: ViewerHost | None = None,
                 automation: AutomationHost | None = None, max_sessions: int = 0, owner: str = "dispo") -> None:
        self.cfg = cfg
        self.machinery = machinery
        self.viewers = viewers
        self.automation = automation  # who relays automation sessions' endpoints (dispod's web/automation.py)
        self.max_sessions = max_sessions
        self.owner = owner
        self.events = Fanout()
        self._live: dict[str, LiveSession] = {}
        self._ended: collections.OrderedDict[str, LiveSession] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.pool: Pool | None = None  # dispod's warm pool (runtime/pool.py), when it keeps one

    def start(self, request: SessionRequest, *, steps: Steps | None = None, plan: Plan | None = None,
              sink: EventSink | None = None, pooled: str = "") -> LiveSession:
        """Begin a session (returns at once, state `starting`); Busy past max_sessions. Without `steps` or a
        `plan`, runtime/plan.py decides where its guest comes from (a guest waiting in the warm pool, a
        restore from a current template that fits, or a boot) and says why; this follows it. `steps`: the
        caller's own list (a template build). `pooled`: a guest for the pool (runtime/pool.py). A state dir
        too deep for the session's sockets is refused here, before anything exists."""
        check_socket_room(self.cfg)
        if plan is None and steps is not None:
            plan = planning.given(steps)
        elif plan is None:
            self._check_room()
            plan = planning.plan(self.cfg, request, self.pool)
        if plan.origin is Origin.POOL:
            assert self.pool is not None
            live = next((g for g in plan.guests if self.pool.hand_out(g, request, sink)), None)
            if live is not None:
                return self._announce(live, plan)
            assert plan.otherwise is not None  # every waiting guest was taken meanwhile
            plan = plan.otherwise
        with self._lock:
            if not pooled:
                self._check_room_locked()
            sid = new_session_id()
            while sid in self._live or sid in self._ended:
                sid = new_session_id()
            # A recorded session's recorder comes after its app (a pooled guest's steps always carry it).
            steps = with_recording(plan.steps) if request.record else plan.steps
            live = LiveSession(self, request, sid, steps=steps, origin=plan.origin, template=plan.template,
                               why=plan.why, sink=sink)
            live.pool_name = pooled
            self._live[sid] = live
        self._announce(live, plan, reserve=not pooled).start()
        return live

    def _check_room(self) -> None:
        with self._lock:
            self._check_room_locked()

    def _check_room_locked(self) -> None:
        users = sum(1 for s in self._live.values() if not s.pool_name)
        if self.max_sessions and users >= self.max_sessions:
            raise Busy(f"{users} session{'s are' if users != 1 else ' is'} running, the most this service allows "
                       f"(max_sessions = {self.max_sessions})")

    def _announce(self, live: LiveSession, plan: Plan, *, reserve: bool = True) -> LiveSession:
        """A session now a request's (new, or a pooled guest just handed out): its viewer URL, and the events
        that say it starts and how."""
        if reserve and self.viewers is not None and live.request.display.value == "web":
            live.viewer_url = self.viewers.reserve(live)
        if reserve and self.automation is not None and live.request.automation:
            live.automation_url = self.automation.reserve(live)
        live.origin, live.start_reason = plan.origin, plan.why
        live.emit(EventKind.STATE, "starting", **live.status())
        if plan.why:
            extra = {"template": live.template} if plan.origin is Origin.POOL else {}
            live.emit(EventKind.NOTICE, plan.why, start=plan.origin.value, **extra)
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

    def stop(self, session_id: str, reason: str, kind: EndKind = EndKind.USER) -> LiveSession:
        live = self.get(session_id)
        live.stop(reason, kind)
        return live

    def shutdown(self, reason: str, timeout: float = 60.0, kind: EndKind = EndKind.USER) -> list[LiveSession]:
        """Stop every session and wait for their teardown; the ones still there after `timeout`."""
        if self.pool is not None:
            self.pool.close()
        sessions = self.sessions(pooled=True)
        for s in sessions:
            s.stop(reason, kind)
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
