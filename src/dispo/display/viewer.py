"""The web viewer: noVNC on 127.0.0.1 behind a random per-session token, proxying to the guest's VNC.

Every URL lives under /<token>/; anything else, or a wrong token, gets 403 before any file is read or any
connection to the guest is made. The page /<token>/ frames noVNC and adds an "End session" button that
calls /<token>/stop, which ends the session through the `on_stop` callback. noVNC itself comes from
Debian's `novnc` package; the WebSocket-to-TCP bridge is this module (websockify's job), so the token
check and the target are ours and nothing else listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import WSMsgType, web

from dispo.errors import NotFound

log = logging.getLogger(__name__)

NOVNC_DIRS = (Path("/usr/share/novnc"),)

_PAGE = string.Template((Path(__file__).parent / "viewer.html").read_text())


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


class WebViewer:
    """A token-protected noVNC viewer serving in a background thread until stop()."""

    def __init__(self, target: Target, *, session_id: str = "", on_stop: Callable[[], None] | None = None,
                 bind: str = "127.0.0.1", port: int = 0, novnc: Path | None = None) -> None:
        self.target = target
        self.session_id = session_id
        self.on_stop = on_stop
        self.bind = bind
        self.port = port
        self.novnc = (novnc or find_novnc()).resolve()
        self.token = secrets.token_urlsafe(24)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
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
        app = web.Application()
        app.router.add_route("*", "/{token}/{tail:.*}", self._dispatch)
        app.router.add_route("*", "/{tail:.*}", self._refuse)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- requests ---------------------------------------------------------------------------------
    async def _refuse(self, request: web.Request) -> web.StreamResponse:
        self.refused += 1
        raise web.HTTPForbidden(text="dispo viewer: this URL needs the session's token\n")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if not hmac.compare_digest(request.match_info["token"].encode(), self.token.encode()):
            return await self._refuse(request)
        tail = request.match_info["tail"]
        if tail == "":
            return web.Response(text=_PAGE.substitute(sid=self.session_id, token=self.token), content_type="text/html",
                                headers={"Cache-Control": "no-store"})
        if tail == "websockify":
            return await self._bridge(request)
        if tail == "stop" and request.method == "POST":
            if self.on_stop is not None:
                self.on_stop()
            return web.Response(text="stopping\n")
        if request.method != "GET":
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        path = (self.novnc / tail).resolve()
        if not path.is_relative_to(self.novnc) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _bridge(self, request: web.Request) -> web.StreamResponse:
        """WebSocket (binary frames) <-> TCP to the guest's VNC server."""
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=0)
        await ws.prepare(request)
        t = self.target
        try:
            opening = asyncio.open_unix_connection(t.unix) if t.unix else asyncio.open_connection(t.host, t.port)
            reader, writer = await asyncio.wait_for(opening, timeout=10)
        except (OSError, TimeoutError) as e:
            log.warning("viewer: cannot reach VNC at %s: %s", t, e)
            await ws.close(code=1011, message=b"guest VNC unreachable")
            return ws

        async def guest_to_browser() -> None:
            while data := await reader.read(65536):
                await ws.send_bytes(data)
            await ws.close()

        pump = asyncio.create_task(guest_to_browser())
        try:
            async for msg in ws:
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
