"""The web viewer: noVNC behind a random per-session token in the path, bridged to the guest's VNC.

Two servers use the same pieces: `WebViewer`, one small server per session on 127.0.0.1 (what `dispo run`
starts in-process), and dispod's one server, whose routes /viewer/<id>/<token>/ serve every session. Both
are hosts of the runtime's `ViewerHost` in web/viewers.py. The pieces are here, once:

- `ViewerEndpoint.handle(request, tail)`: everything under a viewer's token path: the page (`""`), its script
  and style, the session's progress in words (`status`, polled by the page until the display is up and while it
  shows, so it can say what happens and how the session ended), the WebSocket bridge (`websockify`), "End session"
  (`stop`, POST only) and noVNC's own files.
- `static_file`: a file below noVNC's directory; anything that resolves outside it is refused.
- `bridge`: WebSocket (binary frames, bounded size) <-> a stream to the guest's VNC server; for a view link,
  what the browser sends goes through web/rfb.py's `InputFilter` (no keyboard, mouse or clipboard reaches the
  guest).

A link has a `Scope` (dispod hands out several per session, web/viewers.py): `view` gets the page, the status
and the display, watch-only; `interact` is the whole viewer (the page's files, clipboard, sound, "End
session"); `automate` is for the automation endpoint and gets nothing here.

A missing or wrong token gets 403 before any file is read or any connection to the guest is made. noVNC itself
comes from Debian's `novnc` package; the WebSocket-to-VNC bridge is ours (websockify's job), so the token
check and the target are ours and nothing else listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import secrets
import string
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from dispo.errors import NotFound, PermissionProblem
from dispo.runtime.guestio import GuestIO
from dispo.web import rfb, transfers
from dispo.web.guard import (
    CONNECTIONS,
    MIDDLEWARES,
    TOKEN,
    Connections,
    Limits,
    authenticated,
    frame_ancestors,
    holding,
    security_headers,
    token_ok,
)
from dispo.web.server import Server, TcpAddress, bind_tcp

if TYPE_CHECKING:
    from dispo.runtime.live import LiveSession

log = logging.getLogger(__name__)

NOVNC_DIRS = (Path("/usr/share/novnc"),)
MAX_WS_MESSAGE = 1 << 20  # a VNC client sends input events and clipboard text: 1 MiB is plenty
CONNECT_TIMEOUT_S = 10.0
WEBSOCKIFY = "websockify"
STOP = "stop"
STATUS = "status"
ENDED_FROM_VIEWER = "ended from the viewer"  # the end reason of a session whose page's "End session" was pressed
POLL_S = 1.0       # how often the page asks for the status (viewer.js has the same number)
MAX_TEXT = 400     # characters of an error's line or hint the page is sent

# What the page says while a session comes up, by step (runtime/steps.py, runtime/warm.py, runtime/pool.py).
STEP_TEXT = {
    "validate": "Checking the image…",
    "template.validate": "Checking the template…",
    "disk": "Preparing the session's disk…",
    "template.disk": "Preparing the session's disk…",
    "volume": "Attaching the kept volume…",
    "identity": "Making the session's keys…",
    "network": "Setting up the session's network…",
    "vmm.start": "Starting the virtual machine…",
    "vmm.restore": "Restoring the virtual machine…",
    "guest.identity": "Giving the guest its identity…",
    "guest.ready": "Waiting for the guest to boot…",
    "pool.hold": "Taking a guest from the warm pool…",
    "app": "Starting the browser…",
}
CONNECTING = "Connecting to the display…"

_HERE = Path(__file__).parent
_PAGE = string.Template((_HERE / "viewer.html").read_text())
# Our own page's script and style, served from files so the page's CSP needs no 'unsafe-inline'. The names
# are prefixed so they never shadow a file of noVNC's.
_ASSETS = {"dispo-viewer.js": ("viewer.js", "text/javascript"), "dispo-viewer.css": ("viewer.css", "text/css")}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'")  # and frame_ancestors(): none, unless configured

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Scope(StrEnum):
    """What a viewer link may do (POST /v1/sessions/{id}/tokens)."""

    VIEW = "view"          # watch: the page, the status and the display; no input, files, clipboard or sound
    INTERACT = "interact"  # the whole viewer: what a session's viewer_url gives
    AUTOMATE = "automate"  # the automation endpoint alone: the viewer refuses it


VIEW_ONLY = ("this is a view link: it shows the session's screen but cannot type, click, use the clipboard or "
             "files, play sound or end the session")
VIEW_ONLY_HINT = 'for that, ask for an interact link: POST /v1/sessions/ID/tokens {"scope": "interact"}'
AUTOMATE_HERE = "this is an automate token: it serves the session's automation endpoint, not its viewer"
AUTOMATE_HINT = 'for the viewer, ask for a view or interact link: POST /v1/sessions/ID/tokens {"scope": "view"}'


def find_novnc() -> Path:
    for d in NOVNC_DIRS:
        if (d / "vnc.html").is_file():
            return d
    raise NotFound("noVNC is not installed", hint="install the Debian package 'novnc'")


@dataclass(frozen=True)
class Target:
    """Where the guest's VNC server is reached from the host: a TCP address, or a unix socket (an SSH
    forward of the guest's loopback-only VNC into the session state dir, reachable by root alone)."""

    host: str = ""
    port: int = 0
    unix: str = ""

    def __str__(self) -> str:
        return self.unix or f"{self.host}:{self.port}"

    def connector(self) -> Connector:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            opening = (asyncio.open_unix_connection(self.unix) if self.unix
                       else asyncio.open_connection(self.host, self.port))
            return await asyncio.wait_for(opening, timeout=CONNECT_TIMEOUT_S)

        return connect


def _line(text: str) -> str:
    """The first line of `text`, whitespace collapsed, capped: an error's message may go on with the app's
    output (the guest's words), which the page does not need."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return " ".join(first.split())[:MAX_TEXT].rstrip(" ;:")


def progress(live: LiveSession | None, *, display: bool) -> dict[str, Any]:
    """What the viewer page shows: the session's state in words, whether its display can be connected to,
    and once it ended (`done`: the page stops asking) the error's one line and hint. Only this session's own
    state; the page puts every string in as text, never as markup."""
    answer: dict[str, Any] = {"state": "running", "step": "", "display": display, "done": False, "error": None,
                              "text": CONNECTING if display else "Waiting for the session…"}
    if live is None:  # a viewer of a bare VNC target (no session behind it)
        return answer
    state = live.state.value
    answer.update(state=state, step=live.step, detail="")
    if state == "starting" and not live.ended:
        # Where the start is, as the dashboard's row says it: step k of n, warm or cold, time so far.
        names = live.steps.names
        k = names.index(live.step) + 1 if live.step in names else 1
        how = "warm start" if live.warm else "cold start"
        answer["detail"] = f"Step {k} of {len(names)}, {how}, {round(time.time() - live.created)} s so far"
    if live.ended:
        answer.update(display=False, done=True)
        if live.error is not None:
            answer["text"] = "The session failed."
            answer["error"] = {"message": _line(live.error.message), "hint": _line(live.error.hint)}
        else:
            answer["text"] = f"The session ended: {_line(live.end_reason) or 'done'}."
    elif state == "stopping" or live.cancel.is_set():
        answer.update(display=False, text=f"The session is ending ({_line(live.cancel.reason or live.end_reason)})…")
    elif not display:
        answer["text"] = STEP_TEXT.get(live.step, "Starting the session…")
    return answer


def page(session_id: str, ws_path: str, scope: Scope = Scope.INTERACT, embed: str = "") -> web.Response:
    """The viewer page: noVNC in a frame plus an "End session" button. `ws_path` is the bridge's path from
    the server's root, without the leading slash (noVNC's `path` parameter). A view link's page asks noVNC
    for view_only and a scaled screen (not resize=remote, which asks the guest to change its size); the bridge
    drops input whatever the page asks. `embed`: the pages that may frame it ([service] frame_ancestors)."""
    from html import escape

    mode = "view_only=1&resize=scale" if scope is Scope.VIEW else "resize=remote"
    body = _PAGE.substitute(sid=escape(session_id), wspath=escape(ws_path), mode=escape(mode),
                            scope=escape(scope.value))
    return web.Response(text=body, content_type="text/html",
                        headers={"Content-Security-Policy": f"{PAGE_CSP}; {frame_ancestors(embed)}"})


def static_file(root: Path, tail: str) -> web.Response:
    """A file below `root` (noVNC's directory, resolved); 404 for anything outside it or not a file.

    Read whole (noVNC's largest file is about 100 KiB) rather than streamed with sendfile: an answer is then
    complete when the handler returns, which dispod's header timeout relies on (web/guard.py)."""
    path = (root / tail).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound()
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.Response(body=path.read_bytes(), content_type=content_type)


async def bridge(request: web.Request, connect: Connector, *, on_activity: Callable[[], None] | None = None,
                 watch_only: bool = False) -> web.WebSocketResponse:
    """WebSocket (binary frames) <-> the guest's VNC server through `connect`; `watch_only`: the browser's side
    is parsed as RFB and its input dropped (web/rfb.py).

    The WebSocket is accepted first and `connect` awaited after, so a connector that waits for a display still
    coming up (dispod) keeps the browser's connection open meanwhile."""
    ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=MAX_WS_MESSAGE)
    await ws.prepare(request)
    async with holding(request, ws):
        return await _relay(ws, connect, on_activity, rfb.InputFilter() if watch_only else None)


async def _relay(ws: web.WebSocketResponse, connect: Connector, on_activity: Callable[[], None] | None,
                 screen: rfb.InputFilter | None) -> web.WebSocketResponse:
    if ws.closed:  # its link was revoked meanwhile
        return ws
    try:
        reader, writer = await connect()
    except (OSError, TimeoutError) as e:
        log.warning("viewer: cannot reach the guest's VNC: %s", e)
        await ws.close(code=1011, message=b"guest VNC unreachable")
        return ws

    async def guest_to_browser() -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await ws.send_bytes(data)
        await ws.close()

    pump = asyncio.create_task(guest_to_browser())
    try:
        async for msg in ws:
            if on_activity is not None:
                on_activity()  # the viewer asks for frames while it is open: the session is in use
            if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                continue
            data = msg.data if msg.type is WSMsgType.BINARY else msg.data.encode()
            if screen is not None:
                try:
                    data = screen.feed(data)
                except rfb.ProtocolViolation as e:
                    log.warning("viewer: a view link's client sent what it may not (%s): closed", e)
                    await ws.close(code=1008, message=b"not a watch-only VNC client")
                    break
            if data:
                writer.write(data)
                await writer.drain()
    finally:
        pump.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return ws


@dataclass(frozen=True)
class ViewerEndpoint:
    """One session's viewer, wherever it is mounted: what `handle` needs to answer below its token path."""

    session_id: str
    ws_path: str                                  # the bridge's path from the server root, no leading slash
    connect: Connector
    novnc: Path                                   # resolved
    on_stop: Callable[[], object] | None = None
    on_activity: Callable[[], None] | None = None
    io: GuestIO | None = None                     # the session's downloads, uploads, clipboard and sound
    status: Callable[[], dict[str, Any]] | None = None  # `progress()` of the session behind it
    scope: Scope = Scope.INTERACT                 # what the link that reached it may do
    embed: str = ""                               # pages that may frame its page ([service] frame_ancestors)

    async def handle(self, request: web.Request, tail: str) -> web.StreamResponse:
        """Answer `tail`, the path below the (already checked) token."""
        if self.scope is Scope.AUTOMATE:  # dispod's viewers refuse it before; this holds wherever it is mounted
            raise PermissionProblem(AUTOMATE_HERE, hint=AUTOMATE_HINT)
        if tail == WEBSOCKIFY:
            return await bridge(request, self.connect, on_activity=self.on_activity,
                                watch_only=self.scope is Scope.VIEW)
        if self.scope is Scope.VIEW and (tail == STOP or transfers.is_route(tail)):
            raise PermissionProblem(VIEW_ONLY, hint=VIEW_ONLY_HINT)
        if self.io is not None and (answer := await transfers.dispatch(self.io, tail, request)) is not None:
            return answer
        if tail == STOP:
            if request.method != "POST":  # no state change on GET
                raise web.HTTPMethodNotAllowed(request.method, ["POST"])
            if self.on_stop is not None:
                self.on_stop()
            return web.Response(text="stopping\n")
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        if tail in ("", STATUS) or tail in _ASSETS:
            return self._own(tail)
        answer = static_file(self.novnc, tail)
        if self.embed and answer.content_type == "text/html":
            # noVNC's page is framed by the viewer page, itself framed by the embedding page: a browser checks
            # every ancestor (for X-Frame-Options SAMEORIGIN too, which would refuse it), so it names both.
            answer.headers["Content-Security-Policy"] = frame_ancestors(f"'self' {self.embed}")
        return answer

    def _own(self, tail: str) -> web.Response:
        """The viewer's own answers: its page, the page's script and style, and the session's status."""
        if tail == "":
            return page(self.session_id, self.ws_path, self.scope, self.embed)
        if tail == STATUS:
            answer = self.status() if self.status is not None else progress(None, display=True)
            return web.json_response(answer, headers={"Cache-Control": "no-store"})
        name, content_type = _ASSETS[tail]
        return web.Response(body=(_HERE / name).read_bytes(), content_type=content_type)


class WebViewer:
    """A token-protected noVNC viewer of one session, serving in a background thread until stop().

    With `target=None` it serves before the session's display exists (`dispo run` starts it before the guest
    boots, so the page can say what happens); `publish(target)` then lets the bridge through, and `withdraw()`
    closes it again while the page can still learn how the session ended (`status`)."""

    def __init__(self, target: Target | None, *, session_id: str = "", on_stop: Callable[[], object] | None = None,
                 on_activity: Callable[[], None] | None = None, bind: str = "127.0.0.1", port: int = 0,
                 novnc: Path | None = None, limits: Limits | None = None, io: GuestIO | None = None,
                 live: LiveSession | None = None) -> None:
        self.target = target
        self.limits = limits or Limits()
        self.session_id = session_id
        self.bind = bind
        self.port = port
        self.token = secrets.token_urlsafe(24)
        self.live = live
        self.gone = False  # withdrawn: only the status still answers
        self._on_stop = on_stop
        self.endpoint = ViewerEndpoint(session_id, f"{self.token}/{WEBSOCKIFY}", self._connect,
                                       (novnc or find_novnc()).resolve(), self._stop_pressed, on_activity, io,
                                       self._status)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None  # set (on the loop) at publish and withdraw
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._polled = 0.0     # when a page last asked for the status (monotonic)
        self._told_end = False  # a page was told the session is over
        self.refused = 0  # requests turned away for a missing or wrong token

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}/{self.token}/"

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as e:  # reported to the caller below
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=serve, name="dispo-viewer", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def publish(self, target: Target) -> None:
        """The session's display is up: the bridge connects to `target` (from any thread)."""
        self.target = target
        self._wake()

    def withdraw(self) -> None:
        """The session is ending: no more page, files or bridge, but the page still learns how it ended."""
        self.gone = True
        self._wake()

    def page_waiting(self) -> bool:
        """A page asked for the status lately and was not yet told the session is over."""
        return not self._told_end and time.monotonic() - self._polled < 3 * POLL_S

    def _wake(self) -> None:
        loop, changed = self._loop, self._changed
        if loop is not None and changed is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(changed.set)

    def _status(self) -> dict[str, Any]:
        answer = progress(self.live, display=self.target is not None and not self.gone)
        self._polled = time.monotonic()
        self._told_end = self._told_end or bool(answer["done"])
        return answer

    def _stop_pressed(self) -> None:
        self._told_end = True  # the page that pressed "End session" says so itself and asks nothing more
        if self._on_stop is not None:
            self._on_stop()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The guest's VNC, once published (a page opened early waits for it, up to the session's ready
        timeout)."""
        if self.target is None and not self.gone and self._changed is not None:
            wait_s = self.live.request.ready_timeout_s if self.live is not None else CONNECT_TIMEOUT_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
        target = self.target
        if target is None or self.gone or (self.live is not None and self.live.ended):
            raise ConnectionError(f"session {self.session_id} has no display (it ended, or its display is not up)")
        return await target.connector()()

    def __enter__(self) -> WebViewer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start_site(self) -> None:
        # The same guards as dispod's server (web/guard.py): a cap on connections, a deadline for request
        # heads, Host and Origin checks, bounded bodies and WebSocket messages, the security headers.
        limits = self.limits
        self._changed = asyncio.Event()
        app = web.Application(client_max_size=limits.max_body, middlewares=MIDDLEWARES)
        app[TOKEN] = self.token
        app[CONNECTIONS] = Connections()
        app.on_response_prepare.append(security_headers)
        app.router.add_route("*", "/{token}/{tail:.*}", self._dispatch)
        app.router.add_route("*", "/{tail:.*}", self._refuse)
        self._server = Server(app, limits, unix=None, tcp=bind_tcp(TcpAddress(self.bind, self.port)))
        await self._server.start()
        assert self._server.tcp is not None
        self.port = self._server.tcp.port

    async def _shutdown(self) -> None:
        if self._server is not None:
            await self._server.close()

    # -- requests ---------------------------------------------------------------------------------
    async def _refuse(self, request: web.Request) -> web.StreamResponse:
        self.refused += 1
        raise PermissionProblem("this viewer link has a wrong token, or none",
                                hint="open the viewer URL that 'dispo run' printed for this session")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if not token_ok(request.match_info["token"], self.token):
            return await self._refuse(request)
        authenticated(request)
        tail = request.match_info["tail"]
        if self.gone and tail != STATUS:
            raise PermissionProblem("this session has ended; its viewer shows only how it ended",
                                    hint="start a new session for a new viewer")
        return await self.endpoint.handle(request, tail)
