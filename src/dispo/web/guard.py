"""What stands between a client and dispod's routes: connection limits, a header timeout, Host and Origin
checks, the access token, and the headers every answer carries.

aiohttp has no limit on open connections and no deadline for a request's headers, so a client that opens
connections and sends half a header (slowloris) would hold them forever. Each listening socket therefore
wraps aiohttp's protocol in `GuardedProtocol`:

- on TCP a connection counts as *waiting* until one of its requests proved it knows a token (the API's bearer
  token, the dashboard's or a viewer's link). Waiting connections have a budget of their own, per listener
  (`max_waiting`) and per peer address (`max_waiting_per_peer`); past it, the waiting connection of that peer
  (or of the peer with the most) that has waited longest is closed to make room. So slow clients without a
  token can never lock out those with one: a new connection, whose request comes at once, always gets in.
  The unix socket is root-only: its connections never wait;
- past `max_connections` open connections, a waiting one is closed to make room; with none, the new one is
  answered 503 and closed at once;
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
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from dispo.errors import DispoError, InvalidInput, PermissionProblem
from dispo.web import problems
from dispo.web.problems import HttpProblem

log = logging.getLogger(__name__)


def token_ok(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing says nothing about how much of a token was right.
    Tokens are ASCII: anything else (a header's bytes are read as Latin-1) is simply wrong."""
    if not given.isascii():
        given = ""
    return hmac.compare_digest(given.encode(), expected.encode())


class OpenSockets:
    """The WebSockets opened with one token (a viewer's VNC bridge and sound, an automation relay's client), so
    that revoking the token closes them at once. A request carries its token's set as `request[OPEN_SOCKETS]`."""

    REVOKED = 4403  # the close code a revoked link's page sees (4000-4999: the application's own)

    def __init__(self) -> None:
        self._open: set[web.WebSocketResponse] = set()
        self.revoked = False

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.asynccontextmanager
    async def holding(self, ws: web.WebSocketResponse) -> AsyncIterator[None]:
        """While `ws` (prepared) is open; one opened after the revocation is closed at once. The check and the
        add have no await between them, so no socket slips past `close_all`."""
        if self.revoked:
            await ws.close(code=self.REVOKED, message=b"this link was revoked")
        self._open.add(ws)
        try:
            yield
        finally:
            self._open.discard(ws)

    async def close_all(self, timeout_s: float = 2.0) -> None:
        """Revoked: close every open socket (each with a close frame; a client that does not answer it within
        `timeout_s` is cut off by aiohttp's own close timeout)."""
        self.revoked = True
        closing = [ws.close(code=self.REVOKED, message=b"this link was revoked") for ws in list(self._open)]
        if closing:
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=timeout_s)


OPEN_SOCKETS = web.RequestKey("open_sockets", OpenSockets)


def holding(request: web.Request, ws: web.WebSocketResponse) -> contextlib.AbstractAsyncContextManager[None]:
    """`ws` counted as open under its request's token, if the route tracks them (dispod's viewers)."""
    sockets = request.get(OPEN_SOCKETS)
    return sockets.holding(ws) if sockets is not None else contextlib.nullcontext()


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED_LINGER_S = 2.0
API_PREFIX = "/v1/"
EVENTS_PATH = "/v1/events"



# On every answer, errors and streams included: tokens live in URLs, so nothing is cached or leaked to another
# site through a Referer, and nothing is sniffed or embedded elsewhere; and not aiohttp's name and version.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Server": "dispod",
}


NO_FRAMES = "frame-ancestors 'none'"


def frame_ancestors(sources: str = "") -> str:
    """The CSP directive that says which pages may frame an answer: none (every answer of dispod), or for a
    live view's page, the configured sources ([service] frame_ancestors, checked by config.py)."""
    return f"frame-ancestors {sources.strip()}" if sources.strip() else NO_FRAMES


def _embeddable(response: web.StreamResponse) -> bool:
    """Its CSP lets some page frame it (a live view with [service] frame_ancestors set): X-Frame-Options, which
    can name no other origin, must not forbid what the CSP allows (a browser that knows both obeys the CSP)."""
    csp = response.headers.get("Content-Security-Policy", "")
    return "frame-ancestors " in csp and NO_FRAMES not in csp


def _raw_answer(status: str, text: str, extra: str = "") -> bytes:
    """A whole HTTP answer for where aiohttp is not involved (a refused or expired connection)."""
    body = f"dispod: {text}\n".encode()
    headers = "".join(f"{k}: {v}\r\n" for k, v in SECURITY_HEADERS.items())
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
            f"{headers}Content-Length: {len(body)}\r\n\r\n").encode() + body


_REFUSED_503 = _raw_answer("503 Service Unavailable", "too many open connections", "Retry-After: 1\r\n")
_EVICTED_503 = _raw_answer("503 Service Unavailable", "too many connections are waiting to send a request",
                           "Retry-After: 1\r\n")
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
    max_headers: int = 128             # header fields in one request (aiohttp's default)

    @property
    def max_waiting(self) -> int:
        """Connections that have not shown a token yet (TCP): half the cap, so those that have keep the rest."""
        return max(1, self.max_connections // 2)

    @property
    def max_waiting_per_peer(self) -> int:
        return max(1, self.max_connections // 4)


class Listener:
    """One listening socket: who may use it and the connections it has open."""

    def __init__(self, kind: ListenerKind, limits: Limits, allowed_hosts: frozenset[str] = frozenset()) -> None:
        self.kind = kind
        self.limits = limits
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.open: set[GuardedProtocol] = set()
        self.waiting: dict[GuardedProtocol, None] = {}  # not yet shown a token, longest waiting first
        self.refused = 0     # connections answered 503 (over the cap)
        self.evicted = 0     # waiting connections closed to make room for a new one
        self.timed_out = 0   # connections closed for a slow or missing request head

    def host_ok(self, host: str) -> bool:
        return self.kind is ListenerKind.UNIX or host.lower() in self.allowed_hosts

    def make_room(self, peer: str) -> bool:
        """Room for one more connection from `peer`, made by closing a waiting one if a budget is full;
        False if none can be closed (every open connection has shown a token, or is being answered)."""
        limits, waiting = self.limits, self.waiting
        victims: list[GuardedProtocol] = []
        if self.kind is ListenerKind.TCP:
            if sum(c.peer == peer for c in waiting) >= limits.max_waiting_per_peer:
                victims = [c for c in waiting if c.peer == peer]
            elif len(waiting) >= limits.max_waiting:
                by_peer: dict[str, int] = {}
                for c in waiting:
                    by_peer[c.peer] = by_peer.get(c.peer, 0) + 1
                most = max(by_peer, key=by_peer.__getitem__)
                victims = [c for c in waiting if c.peer == most]
        if not victims and len(self.open) >= limits.max_connections:
            victims = list(waiting)
            if not victims:
                return False
        if not victims:
            return True
        idle = next((c for c in victims if not c.busy), None)
        if idle is None:
            return False
        idle.evict()
        return True


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
        self.peer = ""          # the client's address (TCP), for the per-peer budget of waiting connections

    @property
    def busy(self) -> bool:
        return self._busy > 0

    # -- asyncio.Protocol, delegated to aiohttp's handler ------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, tuple) else ""
        if not self.listener.make_room(self.peer):
            self.listener.refused += 1
            transport.write(_REFUSED_503)
            # Half-close and read out what the client still sends: closing with unread data would make the
            # kernel send a reset, and the client might never see the 503. Closed at its EOF or soon after.
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
            return
        self.listener.open.add(self)
        if self.listener.kind is ListenerKind.TCP:
            self.listener.waiting[self] = None
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
        self.listener.waiting.pop(self, None)
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
            if self in self.listener.waiting:  # its wait starts anew, like its head deadline
                del self.listener.waiting[self]
                self.listener.waiting[self] = None
            self._arm()

    def authenticated(self) -> None:
        """A request of this connection showed a token: it no longer counts as waiting."""
        self.listener.waiting.pop(self, None)

    def evict(self) -> None:
        """Closed to make room for a new connection (see Listener.make_room)."""
        self.listener.evicted += 1
        self.listener.open.discard(self)
        self.listener.waiting.pop(self, None)
        self._disarm()
        if self._transport is not None and not self._transport.is_closing():
            if self._partial:
                self._transport.write(_EVICTED_503)
            self._transport.close()

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


class DispodRequestHandler(RequestHandler):
    """aiohttp's protocol, but requests its parser rejects (a bad method, an over-long line, a NUL in a header,
    TLS on the port) are answered like dispod's other errors: one line, the security headers, nothing of the
    request echoed (aiohttp's own answer repeats the bytes it choked on). Relies on `handle_error`, which
    aiohttp calls for those and for handler errors no middleware caught; pinned in pyproject.toml."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.debug("refused a request from %s: %s", request.remote, type(exc).__name__ if exc else status)
        if request.writer.output_size > 0:  # an answer is partly sent: all that is left is to close
            raise ConnectionError("the answer is already under way")
        if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
            problem = HttpProblem(InvalidInput(_parse_error_text(exc),
                                               hint="send one well-formed HTTP/1.1 request (RFC 9112)"), 400)
        elif exc is not None:
            problem = problems.convert(exc)  # logged there
        else:
            problem = HttpProblem(DispoError(f"the request failed (HTTP {status})", hint="try again"), status)
        response = problems.response(problem, api=False)
        response.headers.update(SECURITY_HEADERS)
        response.force_close()
        return response


def _parse_error_text(exc: BaseException | None) -> str:
    """What was wrong with a request aiohttp's parser refused, in words that repeat none of its bytes."""
    if isinstance(exc, BadHttpMethod):
        return "the request does not start with an HTTP method (TLS or another protocol on a plain HTTP port?)"
    if isinstance(exc, LineTooLong):
        return "the request line or a header field is too long"
    if isinstance(exc, InvalidHeader):
        return "a header field has a name or value HTTP does not allow"
    if isinstance(exc, InvalidURLError | BadStatusLine):
        return "the request line is not valid"
    # The rest name the fault first ("Duplicate 'Host' header found.", llhttp's "Invalid header value char:
    # <bytes>"): that part alone, if it is plain words.
    reason = exc.message.split(":", 1)[0].strip().rstrip(".") if isinstance(exc, HttpProcessingError) else ""
    if re.fullmatch(r"[\w '`,-]{1,80}", reason):
        return f"the request is not valid HTTP/1.1: {reason}"
    return "the request is not valid HTTP/1.1"


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
        loop = asyncio.get_running_loop()
        limits = self._listener.limits

        def inner() -> RequestHandler:
            # Made here rather than by `server()`, so that it is dispod's subclass; no access log (as the
            # runner's `access_log=None`, aiohttp's documented off switch, which its annotation lacks).
            return DispodRequestHandler(server, loop=loop, access_log=None,  # type: ignore[arg-type]
                                        max_line_size=limits.max_header_line, max_field_size=limits.max_header_line,
                                        max_headers=limits.max_headers)

        self._server = await loop.create_server(
            lambda: GuardedProtocol(inner, self._listener, self._registry), sock=self._sock)


# -- middlewares (outermost first) -----------------------------------------------------------------
CONNECTIONS = web.AppKey("connections", Connections)
TOKEN = web.AppKey("token", str)
# A node of a cluster (dispo/cluster/) also takes its cluster's secret as the API's bearer: the gateway's
# requests carry it instead of any user's token. Absent (a single host): only TOKEN opens the API.
CLUSTER_SECRET = web.AppKey("cluster_secret", str)

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


def _one(request: web.Request, name: str) -> str | None:
    """A header that must not repeat: two Host or Origin headers are read differently by different parsers."""
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise InvalidInput(f"the request has {len(values)} {name} headers", hint=f"send one {name} header")
    return values[0] if values else None


@web.middleware
async def checked(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, Origin and the token, before any handler runs."""
    listener = listener_of(request)
    host = _one(request, "Host") or ""
    origin = _one(request, "Origin")
    # An absolute-form target ("GET http://name/path") names the host too, and wins over Host (RFC 9112 3.2.2).
    authority = request.url.raw_authority if not request.raw_path.startswith("/") else None
    for name in (host, authority):
        if name is not None and not listener.host_ok(name):
            raise PermissionProblem(f"Host {name[:100]!r} is not this service's address",
                                    hint="use the URL dispod printed (a forwarded port must keep its number)")
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if origin is not None and (upgrade or request.method not in SAFE_METHODS) and \
            origin.lower() != f"http://{host}".lower():
        raise PermissionProblem(f"cross-origin request refused (Origin {origin[:100]!r})",
                                hint="state changes and viewer connections come from dispod's own pages")
    if listener.kind is ListenerKind.TCP and request.path.startswith(API_PREFIX):
        given = bearer(request)
        secret = request.app.get(CLUSTER_SECRET, "")
        if not given or not (token_ok(given, request.app[TOKEN]) or (bool(secret) and token_ok(given, secret))):
            raise HttpProblem(PermissionProblem("the API on TCP needs dispod's access token",
                                                hint="send 'Authorization: Bearer TOKEN' (the token is in "
                                                     "<state_dir>/dispod.token, root-only)"),
                              401, {"WWW-Authenticate": 'Bearer realm="dispod"'})
        authenticated(request)
    return await handler(request)


MIDDLEWARES = (tracked, answer_problems, checked)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if _embeddable(response):
        del response.headers["X-Frame-Options"]


def authenticated(request: web.Request) -> None:
    """The request showed a valid token (a dashboard or viewer link): its connection no longer waits."""
    conn = request.app[CONNECTIONS].find(request.transport)
    if conn is not None:
        conn.authenticated()


def listener_of(request: web.Request) -> Listener:
    """The listener the request came through (`tracked` refused requests of unknown connections)."""
    conn = request.app[CONNECTIONS].find(request.transport)
    if conn is None:
        raise ConnectionResetError("the connection closed")
    return conn.listener


def json_deadline(request: web.Request) -> float:
    return listener_of(request).limits.header_timeout_s


MAX_JSON_DEPTH = 32  # far more than any request needs; a deeper body would overflow the stack of who reads it


def json_value(raw: bytes) -> object:
    """A JSON body, no deeper than MAX_JSON_DEPTH (ValueError otherwise, like any other bad JSON)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError(f"it nests deeper than {MAX_JSON_DEPTH} levels") from None
    level: list[object] = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [v for x in level if isinstance(x, dict | list) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return value
    raise ValueError(f"it nests deeper than {MAX_JSON_DEPTH} levels")


def refuse_body(what: str) -> HttpProblem:
    return HttpProblem(InvalidInput(what, hint="send a JSON object with Content-Type: application/json"), 415)
