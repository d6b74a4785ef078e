"""What stands between a client and dispod's routes: connection limits, a header timeout, Host and Origin
checks, the access token, and the headers every answer carries.

aiohttp has no limit on open connections and no deadline for a request's headers, so a client that opens
connections and sends half a header (slowloris) would hold them forever. Each listening socket therefore
wraps aiohttp's protocol in `GuardedProtocol`:

- past `max_connections` open connections, a new one is answered 503 and closed at once;
- a connection must deliver a complete request head within `header_timeout_s` of opening or of its last
  answer (Go's ReadHeaderTimeout, which doubles as the keep-alive idle timeout); otherwise it gets 408 (or,
  idle after an answer, a plain close). The clock stops while a request is being handled, so event streams
  and viewer WebSockets stay open as long as they are used. A JSON body is read under the same deadline.

Requests: on TCP, the Host header must name the listening address (DNS rebinding) and /v1 needs the bearer
token; on either listener a WebSocket upgrade or a state-changing method (anything but GET/HEAD/OPTIONS) with an
Origin header must come from this origin. The unix socket is root-only (mode 0600 in the root-only state dir),
so it needs no token and its Host is not checked (no browser reaches it).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from dispo.errors import InvalidInput, PermissionProblem
from dispo.web import problems
from dispo.web.problems import HttpProblem


def token_ok(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing says nothing about how much of a token was right."""
    return hmac.compare_digest(given.encode(), expected.encode())


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED_LINGER_S = 2.0
API_PREFIX = "/v1/"
EVENTS_PATH = "/v1/events"



def _raw_answer(status: str, text: str, extra: str = "") -> bytes:
    """A whole HTTP answer for where aiohttp is not involved (a refused or expired connection)."""
    body = f"dispod: {text}\n".encode()
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
            f"Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nX-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


_REFUSED_503 = _raw_answer("503 Service Unavailable", "too many open connections", "Retry-After: 1\r\n")
_TIMEOUT_408 = _raw_answer("408 Request Timeout", "the request head came too slowly")


class ListenerKind(StrEnum):
    UNIX = "unix"
    TCP = "tcp"


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64
    header_timeout_s: float = 10.0
    max_body: int = 64 * 1024          # JSON bodies; aiohttp answers 413 past it
    max_header_line: int = 8190        # aiohttp's own limits on the request line and each header field


class Listener:
    """One listening socket: who may use it and the connections it has open."""

    def __init__(self, kind: ListenerKind, limits: Limits, allowed_hosts: frozenset[str] = frozenset()) -> None:
        self.kind = kind
        self.limits = limits
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.open: set[GuardedProtocol] = set()
        self.refused = 0     # connections answered 503 (over the cap)
        self.timed_out = 0   # connections closed for a slow or missing request head

    def host_ok(self, host: str) -> bool:
        return self.kind is ListenerKind.UNIX or host.lower() in self.allowed_hosts


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """Host header values that name a TCP listener: its address, and the loopback names if it is loopback."""
    ip = ipaddress.ip_address(host)
    names = {f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"}
    if ip.is_loopback:
        names |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    return frozenset(names)


class Connections:
    """The open connections of an app's listeners, by transport, so a request finds its connection."""

    def __init__(self) -> None:
        self._by_transport: dict[asyncio.BaseTransport, GuardedProtocol] = {}

    def add(self, transport: asyncio.BaseTransport, conn: GuardedProtocol) -> None:
        self._by_transport[transport] = conn

    def remove(self, transport: asyncio.BaseTransport) -> None:
        self._by_transport.pop(transport, None)

    def find(self, transport: asyncio.BaseTransport | None) -> GuardedProtocol | None:
        return self._by_transport.get(transport) if transport is not None else None


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's per-connection protocol behind a connection cap and a request-head deadline."""

    def __init__(self, make_inner: Callable[[], RequestHandler], listener: Listener, registry: Connections) -> None:
        self._make_inner = make_inner
        self.listener = listener
        self._registry = registry
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = 0          # requests of this connection being handled now
        self._partial = False   # bytes arrived since the last answer (a request head is on its way)

    # -- asyncio.Protocol, delegated to aiohttp's handler ------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self.listener.open) >= self.listener.limits.max_connections:
            self.listener.refused += 1
            transport.write(_REFUSED_503)
            # Half-close and read out what the client still sends: closing with unread data would make the
            # kernel send a reset, and the client might never see the 503. Closed at its EOF or soon after.
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
            return
        self.listener.open.add(self)
        self._registry.add(transport, self)
        self._inner = self._make_inner()
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:  # else refused: its bytes are dropped
            self._partial = True
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()
        return None  # close the transport: aiohttp does not support half-closed connections either

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.listener.open.discard(self)
        if self._transport is not None:
            self._registry.remove(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- the request-head deadline -----------------------------------------------------------------
    def request_started(self) -> None:
        self._busy += 1
        self._disarm()

    def request_finished(self) -> None:
        self._busy -= 1
        self._partial = False
        if self._busy == 0 and self._transport is not None and not self._transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.listener.limits.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if self._busy or transport is None or transport.is_closing():
            return
        self.listener.timed_out += 1
        if self._partial:
            transport.write(_TIMEOUT_408)
        transport.close()


class GuardedSite(web.BaseSite):
    """An aiohttp site on a socket bound beforehand, its connections guarded."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, listener: Listener, registry: Connections,
                 name: str) -> None:
        super().__init__(runner)
        self._sock = sock
        self._listener = listener
        self._registry = registry
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        inner: Callable[[], RequestHandler] = server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GuardedProtocol(inner, self._listener, self._registry), sock=self._sock)


# -- middlewares (outermost first) -----------------------------------------------------------------
CONNECTIONS = web.AppKey("connections", Connections)
TOKEN = web.AppKey("token", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def tracked(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Find the request's connection (its listener decides the rules), stop its head deadline while the
    request is handled, and send the answer before the deadline runs again."""
    conn = request.app[CONNECTIONS].find(request.transport)
    if conn is None:  # a connection that did not come through a GuardedSite: refuse rather than guess
        raise web.HTTPForbidden(text="dispod: unknown connection\n")
    conn.request_started()
    try:
        response = await handler(request)
        if not response.prepared:
            await response.prepare(request)
            await response.write_eof()
        return response
    finally:
        conn.request_finished()


@web.middleware
async def answer_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error, mapped once: problem+json under /v1, one line of text elsewhere."""
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except web.HTTPException as e:
        if e.status < 400:  # redirects are answers, not problems
            raise
        return problems.response(problems.convert(e), api=request.path.startswith(API_PREFIX))
    except Exception as e:
        return problems.response(problems.convert(e), api=request.path.startswith(API_PREFIX))


def bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    # EventSource cannot send headers: the event stream alone also takes the token as ?access_token=.
    if request.path == EVENTS_PATH and request.method == "GET":
        return request.query.get("access_token", "")
    return ""


@web.middleware
async def checked(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, Origin and the token, before any handler runs."""
    listener = listener_of(request)
    host = request.headers.get("Host", "")
    if not listener.host_ok(host):
        raise PermissionProblem(f"Host {host[:100]!r} is not this service's address",
                                hint="use the URL dispod printed (a forwarded port must keep its number)")
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    origin = request.headers.get("Origin")
    if origin is not None and (upgrade or request.method not in SAFE_METHODS) and \
            origin.lower() != f"http://{host}".lower():
        raise PermissionProblem(f"cross-origin request refused (Origin {origin[:100]!r})",
                                hint="state changes and viewer connections come from dispod's own pages")
    if listener.kind is ListenerKind.TCP and request.path.startswith(API_PREFIX):
        given = bearer(request)
        if not given or not token_ok(given, request.app[TOKEN]):
            raise HttpProblem(PermissionProblem("the API on TCP needs dispod's access token",
                                                hint="send 'Authorization: Bearer TOKEN' (the token is in "
                                                     "<state_dir>/dispod.token, root-only)"),
                              401, {"WWW-Authenticate": 'Bearer realm="dispod"'})
    return await handler(request)


MIDDLEWARES = (tracked, answer_problems, checked)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, errors and streams included: tokens live in URLs, so nothing is cached or leaked
    to another site through a Referer, and nothing is sniffed or embedded elsewhere."""
    h = response.headers
    h["Cache-Control"] = "no-store"
    h["Referrer-Policy"] = "no-referrer"
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "SAMEORIGIN"
    h["Cross-Origin-Resource-Policy"] = "same-origin"
    h["Server"] = "dispod"  # not aiohttp's name and version


def listener_of(request: web.Request) -> Listener:
    """The listener the request came through (`tracked` refused requests of unknown connections)."""
    conn = request.app[CONNECTIONS].find(request.transport)
    if conn is None:
        raise ConnectionResetError("the connection closed")
    return conn.listener


def json_deadline(request: web.Request) -> float:
    return listener_of(request).limits.header_timeout_s


def refuse_body(what: str) -> HttpProblem:
    return HttpProblem(InvalidInput(what, hint="send a JSON object with Content-Type: application/json"), 415)
