"""The runtime's `ViewerHost` (runtime/live.py), twice: who serves a session's web viewer (web/viewer.py).

`StandaloneViewers` is `dispo run`'s (in-process): one `WebViewer`, with its own port and token, per session,
serving from the session's start (so its page says what happens while the guest boots) until `close()`.

`ServiceViewers` is dispod's: every session's viewer as routes of its one server, /viewer/<id>/<token>/...
`reserve` (called by `Runtime.start`, so POST /v1/sessions answers with the URL) makes the session's random
token; `publish` (from the session's thread, once the guest's display answers) tells the bridge where the VNC
socket is; `withdraw` (on teardown) forgets it. A viewer opened before the display is up is served at once:
its WebSocket waits for `publish`, up to the request's ready timeout. Once a session ended, its viewer answers
403 except for `status`, which still says how it ended (for the last `KEEP_ENDED` sessions), so a page that
was open can tell its user.

The runtime never imports this module: the CLI and dispod hand it a host (`Runtime(cfg, viewers=...)`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from dispo.errors import DispoError, PermissionProblem
from dispo.web.guard import authenticated, token_ok
from dispo.web.viewer import (
    ENDED_FROM_VIEWER,
    STATUS,
    WEBSOCKIFY,
    Target,
    ViewerEndpoint,
    WebViewer,
    find_novnc,
    progress,
)

if TYPE_CHECKING:
    from dispo.runtime.live import LiveSession

VIEWER_PREFIX = "/viewer"
_NO_TOKEN = secrets.token_urlsafe(24)  # compared against when the session is unknown: same work, same answer
KEEP_ENDED = 100  # withdrawn viewers whose status still answers (as the runtime keeps its ended sessions)


class StandaloneViewers:
    """`dispo run`'s `ViewerHost`: one WebViewer (its own port and token) per session, in this process. It serves
    from the session's start (so its page says what happens while the guest boots) until `close()`."""

    def __init__(self) -> None:
        self._viewers: dict[str, WebViewer] = {}

    def _start(self, live: LiveSession) -> WebViewer:
        viewer = WebViewer(None, session_id=live.id, on_stop=lambda: live.stop(ENDED_FROM_VIEWER),
                           on_activity=live.touch, io=live.io, live=live)
        viewer.start()
        self._viewers[live.id] = viewer
        return viewer

    def reserve(self, live: LiveSession) -> str | None:
        try:
            return self._start(live).url
        except (DispoError, OSError):
            return None  # no noVNC, no port: `publish` tries again and the session fails with the reason

    def publish(self, live: LiveSession, vnc_socket: Path) -> str:
        viewer = self._viewers.get(live.id) or self._start(live)
        viewer.publish(Target(unix=str(vnc_socket)))
        return viewer.url

    def withdraw(self, session_id: str) -> None:
        viewer = self._viewers.get(session_id)
        if viewer is not None:
            viewer.withdraw()  # still serves the status, so an open page can say how the session ended

    def close(self, grace_s: float = 2.0) -> None:
        """Stop every viewer, once an open page was told its session ended (at most `grace_s` later)."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(
                v.live is not None and v.live.ended and v.page_waiting() for v in self._viewers.values()):
            time.sleep(0.05)
        while self._viewers:
            self._viewers.popitem()[1].stop()


@dataclass
class _Viewer:
    live: LiveSession
    token: str
    socket: Path | None = None
    gone: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (on the loop) at publish or withdraw


class ServiceViewers:
    """dispod's `ViewerHost`: one token per session, all served by the one server."""

    def __init__(self, novnc: Path | None = None) -> None:
        self.base = ""                      # "http://127.0.0.1:8686", set once the listeners are bound
        self._novnc = novnc
        self._loop: asyncio.AbstractEventLoop | None = None
        self._viewers: dict[str, _Viewer] = {}
        self._ended: collections.OrderedDict[str, _Viewer] = collections.OrderedDict()
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop, base: str) -> None:
        self._loop, self.base = loop, base

    def url(self, session_id: str, token: str) -> str:
        return f"{self.base}{VIEWER_PREFIX}/{session_id}/{token}/"

    # -- ViewerHost (called from request handlers and session threads) ------------------------------
    def reserve(self, live: LiveSession) -> str:
        viewer = _Viewer(live, secrets.token_urlsafe(24))
        with self._lock:
            self._viewers[live.id] = viewer
        return self.url(live.id, viewer.token)

    def publish(self, live: LiveSession, vnc_socket: Path) -> str:
        with self._lock:
            viewer = self._viewers.get(live.id)
            if viewer is None:
                viewer = self._viewers[live.id] = _Viewer(live, secrets.token_urlsafe(24))
            viewer.socket = vnc_socket
        self._wake(viewer)
        return self.url(live.id, viewer.token)

    def withdraw(self, session_id: str) -> None:
        with self._lock:
            viewer = self._viewers.pop(session_id, None)
            if viewer is not None:
                self._ended[session_id] = viewer
                while len(self._ended) > KEEP_ENDED:
                    self._ended.popitem(last=False)
        if viewer is not None:
            viewer.gone = True
            self._wake(viewer)

    def _wake(self, viewer: _Viewer) -> None:
        # asyncio.Event is not thread-safe: set it on the loop that waits on it.
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                self._loop.call_soon_threadsafe(viewer.changed.set)

    def find(self, session_id: str, token: str, *, ended: bool = False) -> _Viewer | None:
        """The session's viewer if `token` is its own; with `ended`, also one whose session ended."""
        with self._lock:
            viewer = self._viewers.get(session_id)
            if viewer is None and ended:
                viewer = self._ended.get(session_id)
        ok = token_ok(token, viewer.token if viewer is not None else _NO_TOKEN)
        if viewer is None or not ok:
            return None
        if viewer.gone:
            return viewer if ended else None
        if viewer.live.ended:  # ended before its display came up: withdraw was never called for it
            self.withdraw(session_id)
            return viewer if ended else None
        return viewer

    # -- the route --------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        sid, token, tail = (request.match_info[k] for k in ("session_id", "token", "tail"))
        viewer = self.find(sid, token, ended=tail == STATUS)
        if viewer is None:
            raise PermissionProblem(f"this viewer link is not valid: its token is wrong, or session {sid[:40]!r} "
                                    "ended", hint="ask for the current viewer link: the dashboard's, or the "
                                                  "viewer_url of GET /v1/sessions/ID")
        authenticated(request)
        live = viewer.live
        if self._novnc is None:
            self._novnc = find_novnc().resolve()  # NotFound (a 404 with the hint) if noVNC is not installed
        endpoint = ViewerEndpoint(sid, f"{VIEWER_PREFIX.lstrip('/')}/{sid}/{token}/{WEBSOCKIFY}",
                                  lambda: self._connect(viewer), self._novnc,
                                  on_stop=lambda: live.stop(ENDED_FROM_VIEWER), on_activity=live.touch, io=live.io,
                                  status=lambda: progress(live, display=viewer.socket is not None and not viewer.gone))
        if tail != STATUS:  # the page asks for its status while it is open: that alone is no use of the session
            live.touch()
        return await endpoint.handle(request, tail)

    async def _connect(self, viewer: _Viewer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The guest's VNC, once the session published it (waiting up to its ready timeout)."""
        if viewer.socket is None and not viewer.gone:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(viewer.changed.wait(), viewer.live.request.ready_timeout_s)
        if viewer.socket is None or viewer.gone or viewer.live.ended:
            raise ConnectionError(f"session {viewer.live.id} has no display (it ended, or its display did not "
                                  f"come up within {viewer.live.request.ready_timeout_s:g} s)")
        return await Target(unix=str(viewer.socket)).connector()()

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", VIEWER_PREFIX + "/{session_id}/{token}/{tail:.*}", self.handle)]
