"""The state behind dispod's routes: the one Runtime, the access token, the viewers, the event streams, and
what the reclaim at start found (so GET /v1/sessions/{id} of a session a previous dispod left says so)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from dispo.config import Config
from dispo.errors import NotFound
from dispo.names import check_session_id
from dispo.runtime import Runtime
from dispo.runtime.events import EndKind, Event, EventKind
from dispo.runtime.live import LiveSession
from dispo.web.automation import ServiceAutomation
from dispo.web.sse import Streams
from dispo.web.thumbs import Thumbnails
from dispo.web.viewers import ServiceViewers

RECLAIMED_BY_DISPOD = "reclaimed: its owner (a previous dispod) died"


def reclaimed_status(session_id: str, meta: Mapping[str, Any], owner_gone: str) -> dict[str, Any]:
    """What GET /v1/sessions/{id} says about a session this dispod tore down at start: the shape of
    LiveSession.status(), from what its journal recorded."""
    raw = meta.get("request")
    req: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    created = meta.get("created")
    return {"id": session_id, "name": meta.get("name") or None, "profile": meta.get("profile") or None,
            "image": str(meta.get("image") or ""), "display": str(req.get("display") or "none"), "state": "ended",
            "step": "", "created": float(created) if isinstance(created, int | float) else None, "age_s": None,
            "exit_status": None, "end_reason": owner_gone, "end_kind": EndKind.RECLAIMED.value, "viewer_url": None,
            "address": None,
            "backend": str(req.get("backend") or ""), "accel": None, "error": None,
            "idle_timeout_s": float(req.get("idle_timeout_s") or 0),
            "max_lifetime_s": float(req.get("max_lifetime_s") or 0), "cdp_url": None, "bidi_url": None,
            "steps": [], "ended": None, "receipt": None}


class Service:
    def __init__(self, cfg: Config, rt: Runtime, *, token: str, viewers: ServiceViewers,
                 reclaimed: Mapping[str, dict[str, Any]] | None = None,
                 automation: ServiceAutomation | None = None) -> None:
        self.cfg = cfg
        self.rt = rt
        self.token = token
        self.viewers = viewers
        self.automation = automation or ServiceAutomation(viewers)  # the automation endpoints (web/automation.py)
        self.reclaimed = dict(reclaimed or {})
        self.streams = Streams()
        self.thumbs = Thumbnails()  # the dashboard's pictures of the running sessions' screens
        self.started = time.time()
        self.stopping = False  # dispod is ending its sessions: no new ones
        self._unsubscribe = rt.events.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        # A session that failed before its display came up never withdraws its reserved viewer: do it here.
        if event.kind is EventKind.ENDED:
            self.viewers.withdraw(event.session_id)

    def live(self, session_id: str) -> LiveSession:
        """The session, touched (someone uses it); NotFound also for one that was reclaimed at start."""
        live = self.rt.get(session_id)
        live.touch()
        return live

    def status(self, session_id: str) -> dict[str, Any]:
        check_session_id(session_id)
        try:
            return self.live(session_id).status()
        except NotFound:
            if session_id in self.reclaimed:
                return self.reclaimed[session_id]
            raise

    def statuses(self, *, ended: bool) -> list[dict[str, Any]]:
        found = [s.status() for s in self.rt.sessions(ended=ended)]
        if not ended:  # one that just ended is listed by the runtime until its teardown finished
            found = [s for s in found if s["state"] != "ended"]
        else:
            found += list(self.reclaimed.values())
        return found

    def close(self) -> None:
        self._unsubscribe()
        self.streams.close_all()
