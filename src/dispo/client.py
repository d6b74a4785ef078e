"""DispodClient and AsyncDispodClient: dispod's REST API over its unix socket (no token) or TCP (bearer token),
with httpx, sync and async.

    client = DispodClient.available(cfg)          # None when no dispod answers on <state_dir>/dispod.sock
    live = client.create_session({"image": "minimal", "command": ["sh", "-c", "exit 7"]})
    for event in client.events(session=live["id"]):   # ends after the session's `ended` event
        ...

Each call is described once (`Call`: method, path, query, body, and how its answer is read); the two clients
only send it, each its own way. Errors are mapped once, here: a connection that fails is a ServiceError; an
application/problem+json answer is raised as the DispoError subclass it names (errors.from_problem), with its
message and hint. The SDK (dispo.sdk) is a friendlier layer over these two.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from dispo import errors
from dispo.config import Config
from dispo.errors import DispoError, ServiceError
from dispo.runtime.events import Event, EventKind
from dispo.servicepaths import ServicePaths

UDS_BASE = "http://dispod"  # the host part is only a name here: the transport is the unix socket
TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
# An event stream sends a comment at least every 15 s: a minute of silence means dispod is gone.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)
USER_AGENT = "dispo-client"

T = TypeVar("T")
_DEFAULT: Any = httpx.USE_CLIENT_DEFAULT


def _whole(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def _member(key: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """A listing's answer ({"sessions": [...]}) read as its list."""
    def read(answer: dict[str, Any]) -> list[dict[str, Any]]:
        found = answer.get(key)
        if not isinstance(found, list):
            raise ServiceError(f"dispod answered without the list {key!r}")
        return found
    return read


def _nothing(answer: dict[str, Any]) -> None:
    return None


def _text(answer: dict[str, Any]) -> str:
    return str(answer["text"])


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request of the API and how its JSON answer is read: what DispodClient and AsyncDispodClient send."""

    method: str
    path: str
    read: Callable[[dict[str, Any]], T]
    params: dict[str, str] | None = None
    json: Any = None
    content: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: Any = _DEFAULT  # a float, None (the server bounds its own wait) or the client's default


# -- the API, one call at a time (docs/api.md) --------------------------------------------------------------
def health_call(timeout: float | None = None) -> Call[dict[str, Any]]:
    return Call("GET", "/v1/health", _whole, timeout=_DEFAULT if timeout is None else timeout)


def create_call(body: dict[str, Any]) -> Call[dict[str, Any]]:
    return Call("POST", "/v1/sessions", _whole, json=body)


def sessions_call(all: bool) -> Call[list[dict[str, Any]]]:  # `all`: the API's own word (?all=1)
    return Call("GET", "/v1/sessions", _member("sessions"), params={"all": "1"} if all else None)


def session_call(session_id: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}", _whole)


def delete_call(session_id: str, wait: bool) -> Call[dict[str, Any]]:
    # With wait the server bounds its own wait (WAIT_MAX_S), so no client timeout cuts it short.
    return Call("DELETE", f"/v1/sessions/{_sid(session_id)}", _whole, params={"wait": "1"} if wait else None,
                timeout=None if wait else TIMEOUT_S)


def pool_call() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/pool", _whole)


def pool_fill_call(name: str, count: int) -> Call[dict[str, Any]]:
    return Call("PUT", f"/v1/pool/{quote(name, safe='')}", _whole, json={"count": count})


def pool_drain_call(name: str) -> Call[dict[str, Any]]:
    return Call("DELETE", f"/v1/pool/{quote(name, safe='')}", _whole)


def profiles_call() -> Call[list[dict[str, Any]]]:
    return Call("GET", "/v1/profiles", _member("profiles"))


def images_call() -> Call[list[dict[str, Any]]]:
    return Call("GET", "/v1/images", _member("images"))


def downloads_call(session_id: str) -> Call[list[dict[str, Any]]]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}/downloads", _member("downloads"))


def upload_call(session_id: str, name: str, data: Any, size: int | None = None) -> Call[dict[str, Any]]:
    """`data`: bytes, a binary file (httpx reads it in chunks and takes its size from the file), or an
    iterator of chunks with `size` (dispod wants a Content-Length: an upload is never chunked)."""
    headers = {"Content-Type": "application/octet-stream"}
    if size is not None:
        headers["Content-Length"] = str(size)
    return Call("POST", f"/v1/sessions/{_sid(session_id)}/uploads", _whole, params={"name": name}, content=data,
                headers=headers, timeout=httpx.Timeout(TIMEOUT_S, write=None))


def clipboard_call(session_id: str) -> Call[str]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}/clipboard", _text)


def set_clipboard_call(session_id: str, text: str) -> Call[None]:
    return Call("PUT", f"/v1/sessions/{_sid(session_id)}/clipboard", _nothing, json={"text": text})


def tokens_call(session_id: str) -> Call[list[dict[str, Any]]]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}/tokens", _member("tokens"))


def grant_call(session_id: str, scope: str) -> Call[dict[str, Any]]:
    return Call("POST", f"/v1/sessions/{_sid(session_id)}/tokens", _whole, json={"scope": scope})


def revoke_call(session_id: str, token: str) -> Call[dict[str, Any]]:
    """`token`: the token itself or its id (a path segment, quoted as the id is)."""
    return Call("DELETE", f"/v1/sessions/{_sid(session_id)}/tokens/{quote(str(token), safe='')}", _whole)


def takeover_call(session_id: str) -> Call[dict[str, Any]]:
    return Call("POST", f"/v1/sessions/{_sid(session_id)}/takeover", _whole)


def download_path(session_id: str, name: str) -> str:
    from dispo.runtime.guestio import check_guest_name

    check_guest_name(name)  # "." or ".." in a URL path would name another resource
    return f"/v1/sessions/{_sid(session_id)}/downloads/{quote(name, safe='')}"


def events_params(session: str | None) -> dict[str, str] | None:
    return {"session": session} if session is not None else None


def _sid(session_id: str) -> str:
    """A session id as a path segment: quoted, so an id from elsewhere names no other route (dispod answers
    400 for what is not an id)."""
    return quote(str(session_id), safe="")


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _where(uds: Path | str | None, base_url: str | None) -> tuple[str, str]:
    """(what errors call this dispod, the base URL httpx uses)."""
    if (uds is None) == (base_url is None):
        raise ValueError("give either uds= or base_url=")
    if uds is not None:
        return f"unix:{uds}", UDS_BASE
    return str(base_url), str(base_url)


def read_answer(r: httpx.Response, where: str, call: Call[T]) -> T:
    """A call's answer: its JSON object read as the call says, or the error it is (mapped once, here)."""
    if r.is_error:
        raise problem(r, where)
    try:
        data = r.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ServiceError(f"dispod at {where} answered {call.method} {call.path} with something that is not "
                           "a JSON object")
    return call.read(data)


def unreachable(e: httpx.HTTPError, where: str) -> ServiceError:
    return ServiceError(f"dispod at {where} did not answer: {e or type(e).__name__}")


def problem(r: httpx.Response, where: str) -> DispoError:
    """An error answer as the DispoError it names (read its body first when it was streamed)."""
    if r.headers.get("content-type", "").startswith("application/problem+json"):
        try:
            found = r.json()
        except ValueError:
            found = None
        if isinstance(found, dict):
            return errors.from_problem(found)
    return ServiceError(f"dispod at {where} answered HTTP {r.status_code}: {r.text[:200].strip()}")


class DispodClient:
    def __init__(self, *, uds: Path | str | None = None, base_url: str | None = None, token: str | None = None,
                 timeout: float = TIMEOUT_S) -> None:
        self.where, base = _where(uds, base_url)
        transport = httpx.HTTPTransport(uds=str(uds)) if uds is not None else None
        self._http = httpx.Client(base_url=base, transport=transport, headers=_headers(token), timeout=timeout)

    @classmethod
    def available(cls, cfg: Config) -> DispodClient | None:
        """A client when dispod answers on its socket; None when there is no socket, a stale one, or no access."""
        path = ServicePaths(cfg.state_dir).socket
        if not path.exists():
            return None
        client = cls(uds=path)
        try:
            client.health(timeout=PROBE_TIMEOUT_S)
        except DispoError:
            client.close()
            return None
        return client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DispodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API --------------------------------------------------------------------------------------
    def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self.send(health_call(timeout))

    def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/sessions: the new session's status (state starting; viewer_url for a web display)."""
        return self.send(create_call(body))

    def sessions(self, all: bool = False) -> list[dict[str, Any]]:
        return self.send(sessions_call(all))

    def session(self, session_id: str) -> dict[str, Any]:
        return self.send(session_call(session_id))

    def delete(self, session_id: str, wait: bool = False) -> dict[str, Any]:
        """End the session; with wait, return once it ended and everything it made is gone."""
        return self.send(delete_call(session_id, wait))

    def pool(self) -> dict[str, Any]:
        """GET /v1/pool: the memory budget and, per name, the target and the waiting guests."""
        return self.send(pool_call())

    def pool_fill(self, name: str, count: int) -> dict[str, Any]:
        return self.send(pool_fill_call(name, count))

    def pool_drain(self, name: str) -> dict[str, Any]:
        return self.send(pool_drain_call(name))

    def profiles(self) -> list[dict[str, Any]]:
        return self.send(profiles_call())

    def images(self) -> list[dict[str, Any]]:
        return self.send(images_call())

    # -- a session's files and clipboard (web/transfers.py) ----------------------------------------------
    def downloads(self, session_id: str) -> list[dict[str, Any]]:
        return self.send(downloads_call(session_id))

    @contextlib.contextmanager
    def download(self, session_id: str, name: str) -> Iterator[Iterator[bytes]]:
        """The bytes of a complete download, in chunks."""
        path = download_path(session_id, name)
        try:
            with self._http.stream("GET", path, timeout=STREAM_TIMEOUT) as r:
                if r.is_error:
                    r.read()
                    raise problem(r, self.where)
                yield r.iter_bytes()
        except httpx.HTTPError as e:
            raise unreachable(e, self.where) from e

    def upload(self, session_id: str, name: str, data: bytes | IO[bytes] | Iterable[bytes],
               size: int | None = None) -> dict[str, Any]:
        """The guest's ~/Uploads gets `data` as `name` (or a name like it: the answer's `name`)."""
        return self.send(upload_call(session_id, name, data, size))

    def clipboard(self, session_id: str) -> str:
        return self.send(clipboard_call(session_id))

    def set_clipboard(self, session_id: str, text: str) -> None:
        self.send(set_clipboard_call(session_id, text))

    # -- a session's scoped tokens (web/viewers.py) ---------------------------------------------------
    def tokens(self, session_id: str) -> list[dict[str, Any]]:
        """The session's tokens by id and scope (never the secrets)."""
        return self.send(tokens_call(session_id))

    def grant(self, session_id: str, scope: str) -> dict[str, Any]:
        """A new token of `scope` (view, interact, automate): its id, the token itself (shown this once), url."""
        return self.send(grant_call(session_id, scope))

    def revoke(self, session_id: str, token: str) -> dict[str, Any]:
        """Revoke a token (itself or its id): refused from now on, its open connections closed."""
        return self.send(revoke_call(session_id, token))

    def takeover(self, session_id: str) -> dict[str, Any]:
        """Every automate token revoked (their connections closed) and a new interact link for a person."""
        return self.send(takeover_call(session_id))

    def events(self, session: str | None = None) -> Generator[Event, None, None]:
        """The event stream: every session's events, or one session's until its `ended` event."""
        try:
            with self._http.stream("GET", "/v1/events", params=events_params(session), timeout=STREAM_TIMEOUT,
                                   headers={"Accept": "text/event-stream"}) as r:
                if r.is_error:
                    r.read()
                    raise problem(r, self.where)
                sse = SseReader()
                for line in r.iter_lines():
                    event = sse.feed(line)
                    if event is not None:
                        yield event
                        if _last(event, session):
                            return
        except httpx.HTTPError as e:
            raise unreachable(e, self.where) from e

    # -- the boundary ---------------------------------------------------------------------------------
    def send(self, call: Call[T]) -> T:
        try:
            r = self._http.request(call.method, call.path, params=call.params, json=call.json, content=call.content,
                                   headers=call.headers, timeout=call.timeout)
        except httpx.HTTPError as e:
            raise unreachable(e, self.where) from e
        return read_answer(r, self.where, call)


class AsyncDispodClient:
    """DispodClient's calls with httpx.AsyncClient: the same requests (`Call`), the same errors."""

    def __init__(self, *, uds: Path | str | None = None, base_url: str | None = None, token: str | None = None,
                 timeout: float = TIMEOUT_S) -> None:
        self.where, base = _where(uds, base_url)
        transport = httpx.AsyncHTTPTransport(uds=str(uds)) if uds is not None else None
        self._http = httpx.AsyncClient(base_url=base, transport=transport, headers=_headers(token), timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDispodClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        return await self.send(health_call(timeout))

    async def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.send(create_call(body))

    async def sessions(self, all: bool = False) -> list[dict[str, Any]]:
        return await self.send(sessions_call(all))

    async def session(self, session_id: str) -> dict[str, Any]:
        return await self.send(session_call(session_id))

    async def delete(self, session_id: str, wait: bool = False) -> dict[str, Any]:
        return await self.send(delete_call(session_id, wait))

    async def pool(self) -> dict[str, Any]:
        return await self.send(pool_call())

    async def pool_fill(self, name: str, count: int) -> dict[str, Any]:
        return await self.send(pool_fill_call(name, count))

    async def pool_drain(self, name: str) -> dict[str, Any]:
        return await self.send(pool_drain_call(name))

    async def profiles(self) -> list[dict[str, Any]]:
        return await self.send(profiles_call())

    async def images(self) -> list[dict[str, Any]]:
        return await self.send(images_call())

    async def downloads(self, session_id: str) -> list[dict[str, Any]]:
        return await self.send(downloads_call(session_id))

    @contextlib.asynccontextmanager
    async def download(self, session_id: str, name: str) -> AsyncIterator[AsyncIterator[bytes]]:
        path = download_path(session_id, name)
        try:
            async with self._http.stream("GET", path, timeout=STREAM_TIMEOUT) as r:
                if r.is_error:
                    await r.aread()
                    raise problem(r, self.where)
                yield r.aiter_bytes()
        except httpx.HTTPError as e:
            raise unreachable(e, self.where) from e

    async def upload(self, session_id: str, name: str, data: bytes | AsyncIterator[bytes],
                     size: int | None = None) -> dict[str, Any]:
        """As DispodClient.upload; chunks come from an async iterator here, with `size`."""
        return await self.send(upload_call(session_id, name, data, size))

    async def clipboard(self, session_id: str) -> str:
        return await self.send(clipboard_call(session_id))

    async def set_clipboard(self, session_id: str, text: str) -> None:
        await self.send(set_clipboard_call(session_id, text))

    async def tokens(self, session_id: str) -> list[dict[str, Any]]:
        return await self.send(tokens_call(session_id))

    async def grant(self, session_id: str, scope: str) -> dict[str, Any]:
        return await self.send(grant_call(session_id, scope))

    async def revoke(self, session_id: str, token: str) -> dict[str, Any]:
        return await self.send(revoke_call(session_id, token))

    async def takeover(self, session_id: str) -> dict[str, Any]:
        return await self.send(takeover_call(session_id))

    async def events(self, session: str | None = None) -> AsyncGenerator[Event, None]:
        try:
            async with self._http.stream("GET", "/v1/events", params=events_params(session),
                                         timeout=STREAM_TIMEOUT, headers={"Accept": "text/event-stream"}) as r:
                if r.is_error:
                    await r.aread()
                    raise problem(r, self.where)
                sse = SseReader()
                async for line in r.aiter_lines():
                    event = sse.feed(line)
                    if event is not None:
                        yield event
                        if _last(event, session):
                            return
        except httpx.HTTPError as e:
            raise unreachable(e, self.where) from e

    async def send(self, call: Call[T]) -> T:
        try:
            r = await self._http.request(call.method, call.path, params=call.params, json=call.json,
                                         content=call.content, headers=call.headers, timeout=call.timeout)
        except httpx.HTTPError as e:
            raise unreachable(e, self.where) from e
        return read_answer(r, self.where, call)


def _last(event: Event, session: str | None) -> bool:
    """One session's stream is over with its `ended` event."""
    return session is not None and event.kind is EventKind.ENDED and event.session_id == session


class SseReader:
    """Server-Sent Events, a line at a time (the subset dispod sends: `event:` and `data:` lines, comments,
    blank separators)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event this line completes, if it does."""
        if line == "":
            data, self._data = self._data, []
            if data:
                try:
                    return Event.from_json(json.loads("\n".join(data)))
                except (ValueError, KeyError, TypeError) as e:
                    raise ServiceError(f"dispod sent an event that is not dispo's: {e}") from None
        elif line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
        # A comment (`:`) is a keep-alive; `event:` repeats the kind that is in the data; other fields (id,
        # retry) are not used by dispod.
        return None

