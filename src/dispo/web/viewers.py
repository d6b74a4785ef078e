"""The runtime's `ViewerHost` (runtime/live.py), twice: who serves a session's web viewer (web/viewer.py).

`StandaloneViewers` is `dispo run`'s (in-process): one `WebViewer`, with its own port and token, per session,
serving from the session's start (so its page says what happens while the guest boots) until `close()`.

`ServiceViewers` is dispod's: every session's viewer as routes of its one server, /viewer/<id>/<token>/...
`reserve` (called by `Runtime.start`, so POST /v1/sessions answers with the URL) makes the session's first
token, an interact one (its viewer_url), and, for a session with automation, its first automate one (its
cdp_url or bidi_url, which web/automation.py's `reserve` asks for with `automation_url` as the session is
announced). Both are made with the session's record, whichever of `reserve`, `publish` or `automation_url`
comes first, so the URLs the session announces are good from then on. `mint` makes more, each with its scope
(view, interact, automate: web/viewer.py `Scope`), `tokens` lists them (by id, without the secret) and
`revoke` forgets one and closes the WebSockets opened with it (an automate token's: the relays of
web/automation.py, both sides). A token is good for its own session and scope alone: the viewer routes refuse
automate tokens, the automation route takes nothing else. One token system for both.

`publish` (from the session's thread, once the guest's display answers) tells the bridge where the VNC
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
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from dispo.errors import Busy, Conflict, DispoError, InvalidInput, NotFound, PermissionProblem
from dispo.runtime.events import EndKind
from dispo.web.guard import OPEN_SOCKETS, OpenSockets, authenticated, token_ok
from dispo.web.viewer import (
    AUTOMATE_HERE,
    AUTOMATE_HINT,
    ENDED_FROM_VIEWER,
    STATUS,
    WEBSOCKIFY,
    Scope,
    Target,
    ViewerEndpoint,
    WebViewer,
    find_novnc,
    progress,
)

if TYPE_CHECKING:
    from dispo.runtime.live import LiveSession

VIEWER_PREFIX = "/viewer"
AUTOMATION_PREFIX = "/automation"  # web/automation.py's route: ws://HOST:PORT/automation/ID/TOKEN/PROTOCOL
_NO_TOKEN = secrets.token_urlsafe(24)  # compared against when the session is unknown: same work, same answer
KEEP_ENDED = 100  # withdrawn viewers whose status still answers (as the runtime keeps its ended sessions)
MAX_TOKENS = 32   # per session: minting is cheap, so a cap keeps a loop of POSTs from growing dispod
_TOKEN_OR_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what DELETE .../tokens/{token} takes (openapi.py)
TOKEN_ID_HEX = 12  # a token's public id: what the listing shows and DELETE takes (besides the token itself)


class StandaloneViewers:
    """`dispo run`'s `ViewerHost`: one WebViewer (its own port and token) per session, in this process. It serves
    from the session's start (so its page says what happens while the guest boots) until `close()`."""

    def __init__(self) -> None:
        self._viewers: dict[str, WebViewer] = {}

    def _start(self, live: LiveSession) -> WebViewer:
        viewer = WebViewer(None, session_id=live.id,
                           on_stop=lambda: live.stop(ENDED_FROM_VIEWER, EndKind.VIEWER), on_activity=live.touch,
                           io=live.io, live=live)
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
class Grant:
    """One token of a session: its secret (in the link), its public id, its scope and its open WebSockets."""

    scope: Scope
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    id: str = field(default_factory=lambda: secrets.token_hex(TOKEN_ID_HEX // 2))
    created: float = field(default_factory=time.time)
    sockets: OpenSockets = field(default_factory=OpenSockets)

    def to_json(self) -> dict[str, object]:
        """What GET /v1/sessions/{id}/tokens lists: never the secret."""
        return {"id": self.id, "scope": self.scope.value, "created": round(self.created, 3),
                "connections": len(self.sockets)}


@dataclass
class _Viewer:
    live: LiveSession
    grants: list[Grant]  # the first is the session's viewer_url (interact), unless revoked
    socket: Path | None = None
    gone: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (on the loop) at publish or withdraw
    first: str = ""      # the viewer_url's token, kept for publish's answer even once revoked
    automate: str = ""   # with automation: the cdp_url's (bidi_url's) token, kept as `first` is

    @classmethod
    def new(cls, live: LiveSession) -> _Viewer:
        grant = Grant(Scope.INTERACT)
        viewer = cls(live, [grant], first=grant.secret)
        if live.request.automation:  # made with the record, so no later record can replace the announced one
            automate = Grant(Scope.AUTOMATE)
            viewer.grants.append(automate)
            viewer.automate = automate.secret
        return viewer


class ServiceViewers:
    """dispod's `ViewerHost`: every session's tokens, all served by the one server."""

    def __init__(self, novnc: Path | None = None, *, frame_ancestors: str = "") -> None:
        self.base = ""                      # "http://127.0.0.1:8686", set once the listeners are bound
        self._novnc = novnc
        self.frame_ancestors = frame_ancestors  # pages that may embed a live view ([service] frame_ancestors)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._viewers: dict[str, _Viewer] = {}
        self._ended: collections.OrderedDict[str, _Viewer] = collections.OrderedDict()
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop, base: str) -> None:
        self._loop, self.base = loop, base

    def url(self, session_id: str, token: str) -> str:
        return f"{self.base}{VIEWER_PREFIX}/{session_id}/{token}/"

    def _automation_url(self, live: LiveSession, token: str) -> str | None:
        """None without automation, or when dispod has no TCP listener (a program cannot reach a unix socket)."""
        if not live.request.automation or not self.base.startswith("http://"):
            return None
        return f"ws://{self.base.removeprefix('http://')}{AUTOMATION_PREFIX}/{live.id}/{token}/{live.request.automation}"

    # -- ViewerHost (called from request handlers and session threads) ------------------------------
    def reserve(self, live: LiveSession) -> str:
        viewer = _Viewer.new(live)
        with self._lock:
            self._viewers[live.id] = viewer
        return self.url(live.id, viewer.first)

    def publish(self, live: LiveSession, vnc_socket: Path) -> str:
        with self._lock:
            viewer = self._viewers.get(live.id)
            if viewer is None:
                viewer = self._viewers[live.id] = _Viewer.new(live)
            viewer.socket = vnc_socket
        self._wake(viewer)
        return self.url(live.id, viewer.first)

    def automation_url(self, live: LiveSession) -> str | None:
        """The session's automation URL, with its first automate token (web/automation.py `reserve`). The
        runtime reserves the viewer first; the record is made here if it has not been, as `publish` does."""
        with self._lock:
            viewer = self._viewers.get(live.id)
            if viewer is None:
                viewer = self._viewers[live.id] = _Viewer.new(live)
        return self._automation_url(live, viewer.automate)

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

    def find(self, session_id: str, token: str, *, ended: bool = False) -> tuple[_Viewer, Grant] | None:
        """The session's viewer and the grant `token` is, if it is one of its own; with `ended`, also of a
        session that ended. Every grant's secret is compared (in constant time), so the time taken says nothing
        about which one matched."""
        with self._lock:
            viewer = self._viewers.get(session_id)
            if viewer is None and ended:
                viewer = self._ended.get(session_id)
            grants = list(viewer.grants) if viewer is not None else []
        found = None
        for grant in grants or [Grant(Scope.VIEW, secret=_NO_TOKEN)]:
            if token_ok(token, grant.secret) and viewer is not None:
                found = grant
        if viewer is None or found is None:
            return None
        if viewer.gone:
            return (viewer, found) if ended else None
        if viewer.live.ended:  # ended before its display came up: withdraw was never called for it
            self.withdraw(session_id)
            return (viewer, found) if ended else None
        return viewer, found

    def display_socket(self, session_id: str) -> Path | None:
        """The session's display (its VNC socket) once published, while it runs: for its thumbnail."""
        with self._lock:
            viewer = self._viewers.get(session_id)
        if viewer is None or viewer.gone or viewer.live.ended:
            return None
        return viewer.socket

    # -- the tokens (POST, GET and DELETE /v1/sessions/{id}/tokens, from the loop) ----------------
    def _of(self, session_id: str, *, ended: bool) -> _Viewer:
        with self._lock:
            viewer = self._viewers.get(session_id) or (self._ended.get(session_id) if ended else None)
        if viewer is None or (not ended and (viewer.gone or viewer.live.ended)):
            raise Conflict(f"session {session_id} has no viewer: it has no web display, or it ended",
                           hint="tokens are for running sessions started with a web display (a browser profile)")
        return viewer

    def mint(self, session_id: str, scope: Scope) -> Grant:
        """A new token of `scope` for the (running) session."""
        viewer = self._of(session_id, ended=False)
        with self._lock:
            if len(viewer.grants) >= MAX_TOKENS:
                raise Busy(f"session {session_id} has {len(viewer.grants)} tokens, the most one session has",
                           hint="revoke one: DELETE /v1/sessions/ID/tokens/TOKEN")
            grant = Grant(scope)
            viewer.grants.append(grant)
        return grant

    def tokens(self, session_id: str) -> list[Grant]:
        viewer = self._of(session_id, ended=True)
        with self._lock:
            return list(viewer.grants)

    async def revoke(self, session_id: str, token: str) -> dict[str, object]:
        """Forget the token (`token` is its id or its secret): refused from now on, its WebSockets closed."""
        if not _TOKEN_OR_ID.fullmatch(token):
            raise InvalidInput(f"{token[:64]!r} is not a token or a token id",
                               hint="GET /v1/sessions/ID/tokens lists the ids")
        viewer = self._of(session_id, ended=True)
        with self._lock:
            match = [g for g in viewer.grants if token_ok(token, g.secret) or token_ok(token, g.id)]
            for grant in match:
                viewer.grants.remove(grant)
        if not match:  # the secret is not repeated back: the answer names what was asked by its length alone
            raise NotFound(f"session {session_id} has no such token (asked for {len(token)} characters)",
                           hint="GET /v1/sessions/ID/tokens lists the ids; a revoked token is gone")
        answer = match[0].to_json()  # before closing: `connections` says how many it closed
        await match[0].sockets.close_all()
        return answer

    async def take_over(self, session_id: str) -> dict[str, object]:
        """A person takes the (running) session over from the programs that drive it: every automate token is
        revoked and its automation connections closed before the answer (the browser's other sides with them),
        and a new interact token is made for the person, whose viewer is then the session's only driver. The
        other view and interact tokens stay: they were handed to people. Programs get no new automate token
        unless dispod's owner makes one (POST .../tokens needs dispod's own token, which no session token is)."""
        viewer = self._of(session_id, ended=False)
        with self._lock:
            taken = [g for g in viewer.grants if g.scope is Scope.AUTOMATE]
            for grant in taken:
                viewer.grants.remove(grant)
        revoked = [g.to_json() for g in taken]  # before closing: `connections` says how many each had
        closed = sum(len(g.sockets) for g in taken)
        await asyncio.gather(*(g.sockets.close_all() for g in taken))
        person = self.mint(session_id, Scope.INTERACT)
        return {"revoked": revoked, "connections": closed, "id": person.id, "token": person.secret,
                "scope": person.scope.value, "url": self.url(session_id, person.secret)}

    def url_of(self, session_id: str, grant: Grant) -> str | None:
        """Where the grant is used: the viewer for view and interact; for automate, the session's automation
        endpoint (None if the session has none)."""
        if grant.scope is not Scope.AUTOMATE:
            return self.url(session_id, grant.secret)
        return self._automation_url(self._of(session_id, ended=True).live, grant.secret)

    # -- the route --------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        sid, token, tail = (request.match_info[k] for k in ("session_id", "token", "tail"))
        found = self.find(sid, token, ended=tail == STATUS)
        if found is None:
            raise PermissionProblem(f"this viewer link is not valid: its token is wrong or revoked, or session "
                                    f"{sid[:40]!r} ended", hint="ask for the current viewer link: the "
                                    "dashboard's, or the viewer_url of GET /v1/sessions/ID")
        viewer, grant = found
        if grant.scope is Scope.AUTOMATE:
            raise PermissionProblem(AUTOMATE_HERE, hint=AUTOMATE_HINT)
        authenticated(request)
        request[OPEN_SOCKETS] = grant.sockets
        live = viewer.live
        if self._novnc is None:
            self._novnc = find_novnc().resolve()  # NotFound (a 404 with the hint) if noVNC is not installed
        endpoint = ViewerEndpoint(sid, f"{VIEWER_PREFIX.lstrip('/')}/{sid}/{token}/{WEBSOCKIFY}",
                                  lambda: self._connect(viewer), self._novnc,
                                  on_stop=lambda: live.stop(ENDED_FROM_VIEWER, EndKind.VIEWER),
                                  on_activity=live.touch, io=live.io,
                                  status=lambda: progress(live, display=viewer.socket is not None and not viewer.gone),
                                  scope=grant.scope, embed=self.frame_ancestors)
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
