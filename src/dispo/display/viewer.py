"""The web viewer: noVNC behind a random per-session token in the path, bridged to the guest's VNC.

Two servers use the same pieces: `WebViewer`, one small server per session on 127.0.0.1 (what `dispo run`
starts in-process), and dispod's one server, whose routes /viewer/<id>/<token>/ serve every session
(web/viewers.py). The pieces are here, once:

- `ViewerEndpoint.handle(request, tail)`: everything under a viewer's token path: the page (`""`), its script
  and style, the WebSocket bridge (`websockify`), "End session" (`stop`, POST only) and noVNC's own files.
- `static_file`: a file below noVNC's directory; anything that resolves outside it is refused.
- `bridge`: WebSocket (binary frames, bounded size) <-> a stream to the guest's VNC server.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import WSMsgType, web

from dispo.errors import NotFound, PermissionProblem
from dispo.runtime.guestio import GuestIO
from dispo.web import transfers
from dispo.web.guard import (
    CONNECTIONS,
    MIDDLEWARES,
    TOKEN,
    Connections,
    Limits,
    authenticated,
    security_headers,
    token_ok,
)
from dispo.web.server import Server, TcpAddress, bind_tcp

log = logging.getLogger(__name__)

NOVNC_DIRS = (Path("/usr/share/novnc"),)
MAX_WS_MESSAGE = 1 << 20  # a VNC client sends input events and clipboard text: 1 MiB is plenty
CONNECT_TIMEOUT_S = 10.0
WEBSOCKIFY = "websockify"
STOP = "stop"

_HERE = Path(__file__).parent
_PAGE = string.Template((_HERE / "viewer.html").read_text())
# Our own page's script and style, served from files so the page's CSP needs no 'unsafe-inline'. The names
# are prefixed so they never shadow a file of noVNC's.
_ASSETS = {"dispo-viewer.js": ("viewer.js", "text/javascript"), "dispo-viewer.css": ("viewer.css", "text/css")}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


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


def page(session_id: str, ws_path: str) -> web.Response:
    """The viewer page: noVNC in a frame plus an "End session" button. `ws_path` is the bridge's path from
    the server's root, without the leading slash (noVNC's `path` parameter)."""
    from html import escape

    body = _PAGE.substitute(sid=escape(session_id), wspath=escape(ws_path))
    return web.Response(text=body, content_type="text/html", headers={"Content-Security-Policy": PAGE_CSP})


def static_file(root: Path, tail: str) -> web.Response:
    """A file below `root` (noVNC's directory, resolved); 404 for anything outside it or not a file.

    Read whole (noVNC's largest file is about 100 KiB) rather than streamed with sendfile: an answer is then
    complete when the handler returns, which dispod's header timeout relies on (web/guard.py)."""
    path = (root / tail).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound()
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.Response(body=path.read_bytes(), content_type=content_type)


async def bridge(request: web.Request, connect: Connector, *, on_activity: Callable[[], None] | None = None
                 ) -> web.WebSocketResponse:
    """WebSocket (binary frames) <-> the guest's VNC server through `connect`.

    The WebSocket is accepted first and `connect` awaited after, so a connector that waits for a display still
    coming up (dispod) keeps the browser's connection open meanwhile."""
    ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=MAX_WS_MESSAGE)
    await ws.prepare(request)
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
            if msg.type is WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()
            elif msg.type is WSMsgType.TEXT:
                writer.write(msg.data.encode())
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

    async def handle(self, request: web.Request, tail: str) -> web.StreamResponse:
        """Answer `tail`, the path below the (already checked) token."""
        if tail == WEBSOCKIFY:
            return await bridge(request, self.connect, on_activity=self.on_activity)
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
        if tail == "":
            return page(self.session_id, self.ws_path)
        if tail in _ASSETS:
            name, content_type = _ASSETS[tail]
            return web.Response(body=(_HERE / name).read_bytes(), content_type=content_type)
        return static_file(self.novnc, tail)


class WebViewer:
    """A token-protected noVNC viewer of one session, serving in a background thread until stop()."""

    def __init__(self, target: Target, *, session_id: str = "", on_stop: Callable[[], object] | None = None,
                 on_activity: Callable[[], None] | None = None, bind: str = "127.0.0.1", port: int = 0,
                 novnc: Path | None = None, limits: Limits | None = None, io: GuestIO | None = None) -> None:
        self.target = target
        self.limits = limits or Limits()
        self.session_id = session_id
        self.bind = bind
        self.port = port
        self.token = secrets.token_urlsafe(24)
        self.endpoint = ViewerEndpoint(session_id, f"{self.token}/{WEBSOCKIFY}", target.connector(),
                                       (novnc or find_novnc()).resolve(), on_stop, on_activity, io)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
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

    def __enter__(self) -> WebViewer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start_site(self) -> None:
        # The same guards as dispod's server (web/guard.py): a cap on connections, a deadline for request
        # heads, Host and Origin checks, bounded bodies and WebSocket messages, the security headers.
        limits = self.limits
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
        return await self.endpoint.handle(request, request.match_info["tail"])
