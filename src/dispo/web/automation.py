"""dispod's automation endpoint: a session's browser driven by programs (Playwright, Puppeteer, WebDriver BiDi).

A session started with `"automation": true` has its browser listen for its debugging protocol on the guest's
loopback only (runtime/request.py AUTOMATION_OPTIONS); the session's SSH forwards that port to a unix socket
in its root-only state dir (runtime/steps.py web_display). Nothing on any network reaches it: dispod relays
it here, at ws://HOST:PORT/automation/ID/TOKEN/cdp (or .../bidi), a URL that `connect_over_cdp` and
Puppeteer's `browserWSEndpoint` take as it is. TOKEN is an automate token of the session's scoped tokens
(web/viewers.py): the URL the session announces (`reserve`) carries the one made with the session's record,
and `POST /v1/sessions/ID/tokens {"scope": "automate"}` makes more. Every token of the session is compared in
constant time (`ServiceViewers.find`); a view or interact token is refused here as a wrong one is. A client's
WebSocket counts as open under its token, so revoking the token closes its relays at once (the client's side
with code 4403, then the browser's) and its URL answers 404 from then on.

Each client connection gets its own WebSocket to the browser through the forward (the browser takes several
at once, so several clients can attach, and one that drops can connect again while the session runs). The
relay passes whole messages, text or binary, and treats both sides as hostile: a message bigger than
MAX_MESSAGE_BYTES, from either side, is refused while it is read (aiohttp stops at the cap) and ends the
connection; at most MAX_CLIENTS connections per session; the browser's /json/version answer is read up to
VERSION_CAP bytes and must name a browser WebSocket path of the expected shape; the client's headers (Origin,
cookies) never reach the browser. A message either way counts as use of the session (its idle timeout). When
either side ends, both are closed; when the session ends (`withdraw`), every relay of it is closed and its
URL answers 404, as does the URL of a session without automation, an unknown one, or a wrong token (one
answer for all, so the answer says nothing about which sessions exist).

The runtime never imports this module: dispod hands it in (`Runtime(cfg, automation=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from dispo import guest
from dispo.errors import Busy, Conflict, GuestIOError, InvalidInput, NotFound
from dispo.web.guard import authenticated
from dispo.web.viewer import Scope
from dispo.web.viewers import AUTOMATION_PREFIX, Grant, ServiceViewers

if TYPE_CHECKING:
    from dispo.runtime.live import LiveSession

log = logging.getLogger(__name__)

PREFIX = AUTOMATION_PREFIX
MAX_MESSAGE_BYTES = 32 << 20  # a CDP screenshot of a large page is a few MiB of base64; far above any command
MAX_CLIENTS = 8               # connections relayed at once per session (each holds a channel into the guest)
VERSION_CAP = 64 << 10        # bytes of the browser's /json/version answer read at most
STEP_TIMEOUT_S = 10.0         # one request to the browser (its version, the WebSocket handshake)
CLOSE_TIMEOUT_S = 2.0         # a side that does not answer a close is dropped after this
RETRY_S = 0.5                 # while the browser starts, its port is asked again this often
BIDI_PATH = "/session"        # Firefox's WebDriver BiDi endpoint
_BROWSER_PATH = re.compile(r"^/devtools/browser/[A-Za-z0-9-]{1,64}$")
_WHERE = f"http://127.0.0.1:{guest.DEBUG_PORT}"  # the browser's own address, as it expects to be asked (Host)


class _StartingUp(Exception):
    """The browser does not answer yet (its port is not open, or the forward is not up): ask again."""


@dataclass(eq=False)
class _Endpoint:
    live: LiveSession
    relays: set[_Relay] = field(default_factory=set)
    taken: int = 0      # client slots in use: connecting or relaying
    gone: bool = False  # withdrawn: the session ended


class _Relay:
    """One client's WebSocket and its own WebSocket to the browser, message by message, until either ends."""

    def __init__(self, client: web.WebSocketResponse, browser: aiohttp.ClientWebSocketResponse,
                 live: LiveSession) -> None:
        self.client, self.browser, self.live = client, browser, live
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        pumps = [asyncio.create_task(self._pump(self.client, self.browser)),
                 asyncio.create_task(self._pump(self.browser, self.client)),
                 asyncio.create_task(self._stopped.wait())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await self._close()

    async def _pump(self, src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        """What `src` sends, to `dst`, until `src` closes or errs (a message over the cap is an error)."""
        async for msg in src:
            if msg.type is WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:  # ERROR (too big, bad frames): the connection is over
                log.debug("session %s: automation connection ended: %s", self.live.id, msg.data)
                return
            self.live.touch()  # automation traffic is use: the idle timeout starts again

    async def _close(self) -> None:
        """Both sides at once: one that does not answer its close holds up neither the other nor dispod."""
        async def close(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)

        await asyncio.gather(close(self.client), close(self.browser))

    def stop(self) -> None:
        """End it (on the loop): both sides are closed by `run`."""
        self._stopped.set()


class ServiceAutomation:
    """dispod's `AutomationHost` (runtime/live.py): every automation session's endpoint, one route of its server.
    Its tokens are the sessions' automate tokens in `viewers`."""

    def __init__(self, viewers: ServiceViewers) -> None:
        self.viewers = viewers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._endpoints: dict[str, _Endpoint] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- AutomationHost (called from request handlers and session threads) ---------------------------
    def reserve(self, live: LiveSession) -> str | None:
        """The session's URL, with its first automate token; None when dispod has no TCP listener (a program
        cannot reach a unix socket)."""
        with self._lock:
            self._endpoints[live.id] = _Endpoint(live)
        return self.viewers.automation_url(live)

    def withdraw(self, session_id: str) -> None:
        with self._lock:
            ep = self._endpoints.pop(session_id, None)
        if ep is None:
            return
        ep.gone = True
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: its connections are gone
                self._loop.call_soon_threadsafe(self._stop_all, ep)

    @staticmethod
    def _stop_all(ep: _Endpoint) -> None:
        for relay in list(ep.relays):
            relay.stop()

    async def close(self, app: web.Application | None = None) -> None:
        """Every relay ends (dispod is stopping)."""
        with self._lock:
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
        for ep in endpoints:
            ep.gone = True
            self._stop_all(ep)

    def find(self, session_id: str, token: str) -> tuple[_Endpoint, Grant] | None:
        """The session's endpoint and the grant `token` is, if it is one of the session's automate tokens."""
        found = self.viewers.find(session_id, token)  # every token of the session, compared in constant time
        with self._lock:
            ep = self._endpoints.get(session_id)
        if found is None or ep is None or ep.gone or found[1].scope is not Scope.AUTOMATE:
            return None
        return ep, found[1]

    def open_connections(self, session_id: str) -> int:
        with self._lock:
            ep = self._endpoints.get(session_id)
        return len(ep.relays) if ep is not None else 0

    # -- the route --------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        sid, token, tail = (request.match_info[k] for k in ("session_id", "token", "tail"))
        found = self.find(sid, token)
        if found is None or tail != found[0].live.request.automation:
            raise NotFound("no automation endpoint here: the session ended, was started without automation, or "
                           "the link's token is wrong, revoked or not an automate token",
                           hint='start the session with "automation": true and use the cdp_url (or bidi_url) of '
                                "GET /v1/sessions/ID")
        ep, grant = found
        authenticated(request)
        client = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, timeout=CLOSE_TIMEOUT_S)
        if not client.can_prepare(request).ok:
            raise InvalidInput(f"{PREFIX}/.../{tail} is a WebSocket endpoint",
                               hint="give the URL to Playwright's connect_over_cdp or Puppeteer's connect"
                                    "({browserWSEndpoint})")
        live = ep.live
        if ep.taken >= MAX_CLIENTS:
            raise Busy(f"session {sid} relays {MAX_CLIENTS} automation connections already, the most it takes",
                       hint="close a connection first")
        ep.taken += 1
        try:
            live.touch()
            session, browser = await self._open_browser(ep)
            try:
                await client.prepare(request)
                relay = _Relay(client, browser, live)
                ep.relays.add(relay)
                try:
                    # Counted under its token, which closes it when revoked (then the relay closes the browser's
                    # side); revoked while it connected: closed at once.
                    async with grant.sockets.holding(client):
                        if not ep.gone:  # withdrawn while it connected: it ends at once
                            await relay.run()
                finally:
                    ep.relays.discard(relay)
                    await relay._close()
            finally:
                await session.close()
        finally:
            ep.taken -= 1
        return client

    async def _open_browser(self, ep: _Endpoint) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
        """A WebSocket to the session's browser through its forward, waiting (up to the session's ready timeout)
        while the session and its browser start."""
        live = ep.live
        loop = asyncio.get_running_loop()
        deadline = loop.time() + live.request.ready_timeout_s
        last = "the session's browser has not started yet"
        while True:
            if ep.gone or live.ended or live.cancel.is_set():
                raise Conflict(f"session {live.id} is ending: its browser takes no more connections",
                               hint="start a new session")
            sock = live.automation_socket
            if sock is not None:
                session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)),
                                                timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT_S))
                try:
                    return session, await self._connect(session, live.request.automation)
                except _StartingUp as e:
                    last = str(e)
                    await session.close()
                except BaseException:
                    await session.close()
                    raise
            if loop.time() >= deadline:
                raise GuestIOError(f"session {live.id}: the browser's debugging endpoint did not answer within "
                                   f"{live.request.ready_timeout_s:g} s ({last})",
                                   hint="the session may still be starting: try again, or see its status")
            await asyncio.sleep(RETRY_S)

    async def _connect(self, session: aiohttp.ClientSession, protocol: str) -> aiohttp.ClientWebSocketResponse:
        path = BIDI_PATH if protocol == "bidi" else await self._browser_path(session)
        try:
            return await session.ws_connect(
                _WHERE + path, max_msg_size=MAX_MESSAGE_BYTES, autoclose=True, autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S))
        except aiohttp.WSServerHandshakeError as e:
            raise GuestIOError(f"the browser refused the automation connection (HTTP {e.status})",
                               hint="the session's browser may not speak this protocol") from None
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as e:
            raise _StartingUp(f"{type(e).__name__}: {e}") from None

    async def _browser_path(self, session: aiohttp.ClientSession) -> str:
        """The path of the browser's own CDP WebSocket, from its /json/version (the guest's answer: checked)."""
        try:
            async with session.get(_WHERE + "/json/version") as resp:
                raw = b""
                while chunk := await resp.content.read(VERSION_CAP + 1 - len(raw)):
                    raw += chunk
                    if len(raw) > VERSION_CAP:
                        raise GuestIOError(f"the browser's /json/version answer is bigger than {VERSION_CAP} bytes")
                status = resp.status
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError, TimeoutError) as e:
            raise _StartingUp(f"{type(e).__name__}: {e}") from None
        try:
            found = json.loads(raw) if status == 200 else None
            url = found.get("webSocketDebuggerUrl") if isinstance(found, dict) else None
            path = "/" + url.split("/", 3)[3] if isinstance(url, str) and url.count("/") >= 3 else ""
        except (ValueError, UnicodeDecodeError, RecursionError):
            path = ""
        if not _BROWSER_PATH.match(path):
            raise GuestIOError("the browser's /json/version answer names no browser WebSocket "
                               "(/devtools/browser/ID)", hint="the guest's browser is not what dispo started")
        return path

    def routes(self) -> list[web.RouteDef]:
        return [web.get(PREFIX + "/{session_id}/{token}/{tail}", self.handle, allow_head=False)]
