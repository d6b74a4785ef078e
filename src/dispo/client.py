"""DispodClient: dispod's REST API over its unix socket (no token) or TCP (bearer token), with httpx.

    client = DispodClient.available(cfg)          # None when no dispod answers on <state_dir>/dispod.sock
    live = client.create_session({"image": "minimal", "command": ["sh", "-c", "exit 7"]})
    for event in client.events(session=live["id"]):   # ends after the session's `ended` event
        ...

Errors are mapped once, here: a connection that fails is a ServiceError; an application/problem+json answer
is raised as the DispoError subclass it names (errors.from_problem), with its message and hint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from dispo import errors
from dispo.config import Config
from dispo.daemon.paths import ServicePaths
from dispo.errors import DispoError, ServiceError
from dispo.runtime.events import Event, EventKind

UDS_BASE = "http://dispod"  # the host part is only a name here: the transport is the unix socket
TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
# An event stream sends a comment at least every 15 s: a minute of silence means dispod is gone.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)


class DispodClient:
    def __init__(self, *, uds: Path | str | None = None, base_url: str | None = None, token: str | None = None,
                 timeout: float = TIMEOUT_S) -> None:
        if (uds is None) == (base_url is None):
            raise ValueError("give either uds= or base_url=")
        headers = {"Accept": "application/json", "User-Agent": "dispo-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        transport = httpx.HTTPTransport(uds=str(uds)) if uds is not None else None
        self.where = f"unix:{uds}" if uds is not None else str(base_url)
        self._http = httpx.Client(base_url=UDS_BASE if uds is not None else str(base_url), transport=transport,
                                  headers=headers, timeout=timeout)

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
        return self._json("GET", "/v1/health", timeout=timeout)

    def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/sessions: the new session's status (state starting; viewer_url for a web display)."""
        return self._json("POST", "/v1/sessions", json=body)

    def sessions(self, all: bool = False) -> list[dict[str, Any]]:  # `all`: the API's own word (?all=1)
        found: list[dict[str, Any]] = self._json("GET", "/v1/sessions", params={"all": "1"} if all else None)[
            "sessions"]
        return found

    def session(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sessions/{session_id}")

    def delete(self, session_id: str, wait: bool = False) -> dict[str, Any]:
        """End the session; with wait, return once it ended and everything it made is gone."""
        timeout = None if wait else TIMEOUT_S  # the server bounds its own wait
        return self._json("DELETE", f"/v1/sessions/{session_id}", params={"wait": "1"} if wait else None,
                          timeout=timeout)

    def pool(self) -> dict[str, Any]:
        """GET /v1/pool: the memory budget and, per name, the target and the waiting guests."""
        return self._json("GET", "/v1/pool")

    def pool_fill(self, name: str, count: int) -> dict[str, Any]:
        return self._json("PUT", f"/v1/pool/{name}", json={"count": count})

    def pool_drain(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/pool/{name}")

    def profiles(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._json("GET", "/v1/profiles")["profiles"]
        return found

    def images(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._json("GET", "/v1/images")["images"]
        return found

    # -- a session's files and clipboard (web/transfers.py) ----------------------------------------------
    def downloads(self, session_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._json("GET", f"/v1/sessions/{session_id}/downloads")["downloads"]
        return found

    @contextlib.contextmanager
    def download(self, session_id: str, name: str) -> Iterator[Iterator[bytes]]:
        """The bytes of a complete download, in chunks."""
        from dispo.runtime.guestio import check_guest_name

        check_guest_name(name)  # "." or ".." in a URL path would name another resource
        path = f"/v1/sessions/{session_id}/downloads/{quote(name, safe='')}"
        try:
            with self._http.stream("GET", path, timeout=STREAM_TIMEOUT) as r:
                if r.is_error:
                    r.read()
                    raise self._problem(r)
                yield r.iter_bytes()
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e

    def upload(self, session_id: str, name: str, data: bytes) -> dict[str, Any]:
        return self._json("POST", f"/v1/sessions/{session_id}/uploads", params={"name": name}, content=data,
                          headers={"Content-Type": "application/octet-stream"})

    def clipboard(self, session_id: str) -> str:
        return str(self._json("GET", f"/v1/sessions/{session_id}/clipboard")["text"])

    def set_clipboard(self, session_id: str, text: str) -> None:
        self._json("PUT", f"/v1/sessions/{session_id}/clipboard", json={"text": text})

    def events(self, session: str | None = None) -> Iterator[Event]:
        """The event stream: every session's events, or one session's until its `ended` event."""
        params = {"session": session} if session else None
        try:
            with self._http.stream("GET", "/v1/events", params=params, timeout=STREAM_TIMEOUT,
                                   headers={"Accept": "text/event-stream"}) as r:
                if r.is_error:
                    r.read()
                    raise self._problem(r)
                for event in parse_sse(r.iter_lines()):
                    yield event
                    if session is not None and event.kind is EventKind.ENDED and event.session_id == session:
                        return
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e

    # -- the boundary ---------------------------------------------------------------------------------
    def _json(self, method: str, path: str, *, timeout: float | object | None = httpx.USE_CLIENT_DEFAULT,
              **kwargs: Any) -> dict[str, Any]:
        try:
            r = self._http.request(method, path, timeout=timeout, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        if r.is_error:
            raise self._problem(r)
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ServiceError(f"dispod at {self.where} answered {method} {path} with something that is not "
                               "a JSON object")
        return data

    def _unreachable(self, e: httpx.HTTPError) -> ServiceError:
        return ServiceError(f"dispod at {self.where} did not answer: {e or type(e).__name__}")

    def _problem(self, r: httpx.Response) -> DispoError:
        if r.headers.get("content-type", "").startswith("application/problem+json"):
            try:
                problem = r.json()
            except ValueError:
                problem = None
            if isinstance(problem, dict):
                return errors.from_problem(problem)
        return ServiceError(f"dispod at {self.where} answered HTTP {r.status_code}: {r.text[:200].strip()}")


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-Sent Events (the subset dispod sends: `event:` and `data:` lines, comments, blank separators)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                try:
                    yield Event.from_json(json.loads("\n".join(data)))
                except (ValueError, KeyError, TypeError) as e:
                    raise ServiceError(f"dispod sent an event that is not dispo's: {e}") from None
            data = []
        elif line.startswith(":"):
            continue  # a keep-alive comment
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # `event:` repeats the kind that is in the data; other fields (id, retry) are not used by dispod
