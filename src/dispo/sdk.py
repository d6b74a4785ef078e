"""The Python SDK: disposable sessions for programs, over dispod's REST API (docs/sdk.md).

    import dispo
    with dispo.connect() as d:                          # this host's dispod, on its unix socket
        with d.session("chromium", url="https://example.org/") as s:   # ended on exit, whatever happens
            s.wait_ready()
            s.download("report.pdf", to=tmp_path); s.upload("data.csv"); s.clipboard = "text"
        s.receipt()["clean"]                            # the disposal receipt, once it ended

    async with dispo.AsyncClient() as d:                # the same with httpx.AsyncClient
        async with d.session("chromium") as s:
            await s.wait_ready()

A thin layer over client.py's DispodClient and AsyncDispodClient: every request and every error mapping is
theirs (a problem answer arrives as the DispoError subclass it names, as for the CLI). What the session JSON
says is what a Session shows; nothing here is an endpoint of its own. The two Session classes share what is not
I/O (_Tracked); each does its I/O its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict, cast

from dispo import errors
from dispo.client import TIMEOUT_S, AsyncDispodClient, DispodClient
from dispo.config import Config
from dispo.errors import Conflict, DispoError, InvalidInput, NotFound, ServiceError
from dispo.runtime.events import Event, EventKind
from dispo.runtime.guestio import host_name
from dispo.servicepaths import ServicePaths

CHUNK = 1 << 16
ADDRESS_HINT = ("give http://HOST:PORT (with token=..., from the state dir's dispod.token), unix:/path/to/dispod.sock, "
                "or nothing for this host's dispod")
# The errors that mean "what the session made is not all gone": raised when a session ends, even though the
# program did nothing wrong, because the promise of disposal did not hold.
DISPOSAL_FAILURES = ("NotClean", "TeardownError")

__all__ = ["AsyncClient", "AsyncSession", "Client", "Download", "Receipt", "Session", "TakeOver", "Token", "connect"]
SCOPES = ("view", "interact", "automate")


class Receipt(TypedDict, total=False):
    """A session's disposal receipt, as dispod sends it in the session's `ended` event (receipt.py)."""

    clean: bool
    leftovers: list[str]
    checked: int
    image_unchanged: bool | None
    teardown_s: float | None
    check_s: float
    requests: dict[str, int] | None  # with log_requests: the requests the guest made, by kind
    kept: list[str]


@dataclass(frozen=True)
class Download:
    """A file in the guest's ~/Downloads; `complete` is false while the browser still writes it."""

    name: str
    size: int
    complete: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Download:
        return cls(str(data["name"]), int(data["size"]), bool(data["complete"]))


@dataclass(frozen=True)
class Token:
    """One of a session's scoped tokens. `token` (the secret) and `url` (where it is used: the viewer link for
    view and interact, the automation URL for automate) are there only as grant() or take_over() made it: a
    listing names tokens by `id` alone. `connections`: the WebSockets open with it when asked."""

    id: str
    scope: str
    created: float | None = None
    connections: int = 0
    token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs (and so out of logs)
    url: str | None = field(default=None, repr=False)    # it holds the token too

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Token:
        created = data.get("created")
        return cls(str(data["id"]), str(data["scope"]), float(created) if created is not None else None,
                   int(data.get("connections") or 0), data.get("token"), data.get("url"))


@dataclass(frozen=True)
class TakeOver:
    """What take_over() did: the automate tokens it revoked, the automation connections it closed, and the
    person's new interact token (its `url` is the viewer link to hand them)."""

    revoked: list[Token]
    connections: int
    viewer: Token

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TakeOver:
        return cls([Token.from_json(t) for t in data.get("revoked") or []], int(data.get("connections") or 0),
                   Token.from_json(data))


def _scope(scope: str) -> str:
    """Checked here too, so a typo is one line before any request."""
    if scope not in SCOPES:
        raise InvalidInput(f"{str(scope)[:40]!r} is not a token scope", hint="one of " + ", ".join(SCOPES))
    return scope


def _token_ref(token: str | Token) -> str:
    """What revoke() sends: the token's id when it is a Token (the secret stays out of URLs and logs)."""
    return token.id if isinstance(token, Token) else str(token)


# -- where dispod is -------------------------------------------------------------------------------------
def _address(url: str | os.PathLike[str] | None, config: Config | None) -> tuple[Path | None, str | None]:
    """(unix socket, base URL): one of them."""
    if url is None:
        if config is None:
            from dispo.config import load

            config = load()
        socket = ServicePaths(config.state_dir).socket
        if not socket.exists():
            raise ServiceError(f"no dispod socket at {socket}: dispod does not run on this host (or state dir)",
                               hint="start dispod, or connect over TCP: dispo.connect('http://HOST:8686', "
                                    "token=...)")
        return socket, None
    text = os.fspath(url)
    if text.startswith("unix:"):
        return Path(text.removeprefix("unix:")), None
    if text.startswith(("http://", "https://")):
        return None, text.rstrip("/")
    if text.startswith("/"):
        return Path(text), None
    raise InvalidInput(f"{text[:100]!r} is not an address of dispod", hint=ADDRESS_HINT)


def _body(**given: Any) -> dict[str, Any]:
    """POST /v1/sessions's body: the keys given (dispod refuses unknown ones, and checks the rest)."""
    if given.get("command") is not None:
        given["command"] = list(given["command"])
    return {k: v for k, v in given.items() if v is not None}


# -- what a session is, without I/O ------------------------------------------------------------------------
class _Tracked:
    """A session as the last answer or event about it says."""

    def __init__(self, status: dict[str, Any]) -> None:
        self._status = dict(status)
        self._receipt: Receipt | None = None
        self._final: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return str(self._status["id"])

    @property
    def status(self) -> dict[str, Any]:
        """The session's JSON (GET /v1/sessions/ID) as last seen; refresh() asks again."""
        return dict(self._status)

    @property
    def state(self) -> str:
        """starting, running, stopping or ended."""
        return str(self._status.get("state", ""))

    @property
    def viewer_url(self) -> str | None:
        """A web display's viewer page, for a person to watch or take over (from the start)."""
        return self._status.get("viewer_url")

    @property
    def cdp_url(self) -> str | None:
        """The session's Chrome DevTools Protocol endpoint, when dispod gives one (the session JSON's
        `cdp_url`); None otherwise."""
        return self._status.get("cdp_url")

    @property
    def bidi_url(self) -> str | None:
        """The session's WebDriver BiDi endpoint (Firefox), when dispod gives one; None otherwise."""
        return self._status.get("bidi_url")

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def receipt(self) -> Receipt:
        """The disposal receipt of a session that ended while this object followed it (end(), the with block,
        or a wait_ready() that saw it end): `clean` is true when everything it made was found gone."""
        if not self.ended:
            raise Conflict(f"session {self.id} has not ended: its receipt is written after its teardown",
                           hint="end it first: s.end(), or leave its with block")
        found = self._receipt or self._status.get("receipt")
        if not found:
            raise NotFound(f"session {self.id} ended before this client followed it: dispod sends a receipt once, "
                           "in the session's `ended` event", hint="end sessions with s.end() or a with block")
        return found

    def _see(self, event: Event) -> None:
        if event.session_id != self.id:
            return
        if event.kind is EventKind.STATE and event.fields.get("id") == self.id:
            self._status = dict(event.fields)
        elif event.kind is EventKind.ENDED:
            self._status["state"] = "ended"
            receipt = event.fields.get("receipt")
            if isinstance(receipt, dict):
                self._receipt = cast(Receipt, receipt)
            for key in ("exit_status", "end_reason", "error"):
                if key in event.fields:
                    self._status[key] = event.fields[key]

    def _not_ready(self) -> DispoError:
        """Why a session that ended never became ready: its own error, else how it ended."""
        error = self._status.get("error")
        if isinstance(error, dict):
            return errors.from_problem(error)
        return Conflict(f"session {self.id} ended before it was ready: {self._status.get('end_reason') or 'ended'}",
                        hint="its end_reason says why")

    def _finish(self, final: dict[str, Any] | None) -> dict[str, Any]:
        """Record the session's last status (None: dispod no longer knows it); raise if its disposal failed."""
        self._status = {**self._status, **(final or {"state": "ended"})}
        if self.ended:
            self._final = dict(self._status)
        error = self._status.get("error")
        if isinstance(error, dict) and error.get("type") in DISPOSAL_FAILURES:
            raise errors.from_problem(error)
        return self.status

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state}>"


def _destination(name: str, to: str | os.PathLike[str]) -> Path:
    """A directory gets the file under its name made safe for the host; anything else is the file's path."""
    dest = Path(to)
    return dest / host_name(name) if dest.is_dir() else dest


def _partial(dest: Path) -> tuple[IO[bytes], Path]:
    """A file beside `dest` to write into, renamed to it only once complete: a half-written download never
    has the name of a finished one."""
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name[:100]}.", suffix=".part")
    except OSError as e:
        raise InvalidInput(f"cannot write into {dest.parent}: {e.strerror}",
                           hint="download to an existing directory, or a file in one") from None
    return os.fdopen(fd, "wb"), Path(tmp)


def _source(data: str | os.PathLike[str] | bytes, name: str | None) -> tuple[str, bytes | None, Path | None]:
    """(the upload's name, its bytes or its file)."""
    if isinstance(data, bytes):
        if not name:
            raise InvalidInput("uploading bytes needs name=", hint='s.upload(b"...", name="file.txt")')
        return name, data, None
    path = Path(data)
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file", hint="give the path of a file to upload")
    return name or path.name, None, path


# -- sync ------------------------------------------------------------------------------------------------
class Session(_Tracked):
    """One disposable session. As a context manager it is ended on exit, whatever happens in the block."""

    def __init__(self, client: Client, status: dict[str, Any]) -> None:
        super().__init__(status)
        self._client = client

    def refresh(self) -> dict[str, Any]:
        self._status = self._client.api.session(self.id)
        return self.status

    def events(self) -> Generator[Event, None, None]:
        """This session's events until its `ended` event (status and receipt follow them)."""
        with contextlib.closing(self._client.api.events(session=self.id)) as stream:
            for event in stream:
                self._see(event)
                yield event

    def wait_ready(self) -> Session:
        """Return once the session runs (its display is up); raise its error if it ends instead. Bounded by
        the session's own ready_timeout_s."""
        if self.state == "running":
            return self
        with contextlib.closing(self.events()) as stream:
            for _ in stream:
                if self.state == "running":
                    return self
                if self.ended:
                    raise self._not_ready()
        if self.refresh()["state"] == "running":  # the stream ended early (dispod stopping)
            return self
        raise self._not_ready()

    def end(self) -> dict[str, Any]:
        """End the session (DELETE) and wait until everything it made is gone: its last status. Its receipt is
        then receipt(). Raises NotClean or TeardownError if the disposal did not hold."""
        if self._final is not None:
            return dict(self._final)
        api = self._client.api
        # NotFound: dispod forgot it (it ended long ago); ServiceError: the stream broke (waited for below).
        if not self.ended:  # (a wait_ready() may have seen it end)
            with contextlib.suppress(NotFound, ServiceError), contextlib.closing(self.events()) as stream:
                next(stream, None)  # the stream is open: it will see the end, and the receipt with it
                if not self.ended:
                    api.delete(self.id)
                    for _ in stream:
                        pass
        final: dict[str, Any] | None = None
        with contextlib.suppress(NotFound):
            # The stream broke or closed before the end (dispod stopping): wait for the end without it.
            final = api.session(self.id) if self.ended else api.delete(self.id, wait=True)
        self._client._open.pop(self.id, None)
        return self._finish(final)

    # -- files and clipboard ---------------------------------------------------------------------------
    def downloads(self) -> list[Download]:
        """The files in the guest's ~/Downloads."""
        return [Download.from_json(d) for d in self._client.api.downloads(self.id)]

    def download(self, name: str, to: str | os.PathLike[str]) -> Path:
        """Copy a complete download to `to` (a file, replaced if it exists; or a directory, where it gets
        its name made safe): the path written."""
        dest = _destination(name, to)
        out, tmp = _partial(dest)
        try:
            with out, self._client.api.download(self.id, name) as chunks:
                for chunk in chunks:
                    out.write(chunk)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def upload(self, data: str | os.PathLike[str] | bytes, *, name: str | None = None) -> str:
        """Put a file (a path, or bytes with name=) into the guest's ~/Uploads: the name it got there."""
        name, raw, path = _source(data, name)
        if path is None:
            return str(self._client.api.upload(self.id, name, raw or b"")["name"])
        with path.open("rb") as f:
            return str(self._client.api.upload(self.id, name, f, size=os.fstat(f.fileno()).st_size)["name"])

    # -- scoped tokens and take-over -------------------------------------------------------------------
    def tokens(self) -> list[Token]:
        """The session's tokens, by id and scope (never their secrets)."""
        return [Token.from_json(t) for t in self._client.api.tokens(self.id)]

    def grant(self, scope: str) -> Token:
        """A new token: "view" (watch only), "interact" (the viewer, as viewer_url) or "automate" (the automation
        endpoint): its `token` (shown this once) and `url`."""
        return Token.from_json(self._client.api.grant(self.id, _scope(scope)))

    def revoke(self, token: str | Token) -> Token:
        """Revoke a token (a Token, its id or the token itself): refused from now on, its open connections
        closed before this returns (`connections`: how many)."""
        return Token.from_json(self._client.api.revoke(self.id, _token_ref(token)))

    def take_over(self) -> TakeOver:
        """A person takes over from the programs: every automate token revoked and its connections closed; the
        answer's `viewer.url` is a new interact link for the person, now the session's only driver."""
        return TakeOver.from_json(self._client.api.takeover(self.id))

    def get_clipboard(self) -> str:
        return self._client.api.clipboard(self.id)

    def set_clipboard(self, text: str) -> None:
        self._client.api.set_clipboard(self.id, text)

    @property
    def clipboard(self) -> str:
        """The guest's clipboard text (each direction as the profile allows)."""
        return self.get_clipboard()

    @clipboard.setter
    def clipboard(self, text: str) -> None:
        self.set_clipboard(text)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.end()
            return
        try:
            self.end()
        except Exception as e:  # the block's own error is the one to see; this one rides along
            exc.add_note(f"ending session {self.id} failed too: {type(e).__name__}: {e}")


class Client:
    """dispod, for programs: start, attach to and end sessions. connect() makes one and checks it answers."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, token: str | None = None,
                 config: Config | None = None, timeout: float = TIMEOUT_S) -> None:
        uds, base = _address(url, config)
        self.api = DispodClient(uds=uds, base_url=base, token=token, timeout=timeout)
        self._open: dict[str, Session] = {}

    @property
    def where(self) -> str:
        return self.api.where

    def health(self) -> dict[str, Any]:
        return self.api.health()

    def session(self, profile: str | None = None, *, url: str | None = None, image: str | None = None,
                command: Sequence[str] | None = None, name: str | None = None, **options: Any) -> Session:
        """Start a session (POST /v1/sessions; any other key of its body as a keyword). It is starting:
        wait_ready() waits for it. Use it as a context manager to end it on exit."""
        body = _body(profile=profile, url=url, image=image, command=command, name=name, **options)
        s = Session(self, self.api.create_session(body))
        self._open[s.id] = s
        return s

    def attach(self, session_id: str) -> Session:
        """A session that exists already (this client will not end it unless told to)."""
        return Session(self, self.api.session(session_id))

    def sessions(self, all: bool = False) -> list[Session]:
        return [Session(self, s) for s in self.api.sessions(all)]

    def profiles(self) -> list[dict[str, Any]]:
        return self.api.profiles()

    def close(self) -> None:
        """End the sessions this client started and the program left running, then close the connection."""
        try:
            failures = []
            for s in list(self._open.values()):
                try:
                    s.end()
                except DispoError as e:
                    failures.append(e)
            if failures:
                raise failures[0]
        finally:
            self.api.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:
            exc.add_note(f"closing the dispod client failed too: {type(e).__name__}: {e}")


def connect(url: str | os.PathLike[str] | None = None, *, token: str | None = None, config: Config | None = None,
            timeout: float = TIMEOUT_S) -> Client:
    """A Client of the dispod at `url` (http://HOST:PORT with its token, unix:/path/to/dispod.sock, or None:
    this host's dispod, on the socket in the config's state dir), checked: ServiceError if it does not
    answer, PermissionProblem if it refuses the token."""
    client = Client(url, token=token, config=config, timeout=timeout)
    try:
        client.health()
    except BaseException:
        client.api.close()
        raise
    return client


# -- async -----------------------------------------------------------------------------------------------
class AsyncSession(_Tracked):
    """Session with awaitable calls; `async with` ends it on exit, whatever happens in the block."""

    def __init__(self, client: AsyncClient, status: dict[str, Any]) -> None:
        super().__init__(status)
        self._client = client

    async def refresh(self) -> dict[str, Any]:
        self._status = await self._client.api.session(self.id)
        return self.status

    async def events(self) -> AsyncGenerator[Event, None]:
        async with contextlib.aclosing(self._client.api.events(session=self.id)) as stream:
            async for event in stream:
                self._see(event)
                yield event

    async def wait_ready(self) -> AsyncSession:
        if self.state == "running":
            return self
        async with contextlib.aclosing(self.events()) as stream:
            async for _ in stream:
                if self.state == "running":
                    return self
                if self.ended:
                    raise self._not_ready()
        if (await self.refresh())["state"] == "running":
            return self
        raise self._not_ready()

    async def end(self) -> dict[str, Any]:
        if self._final is not None:
            return dict(self._final)
        api = self._client.api
        if not self.ended:
            with contextlib.suppress(NotFound, ServiceError):
                async with contextlib.aclosing(self.events()) as stream:
                    await anext(stream, None)
                    if not self.ended:
                        await api.delete(self.id)
                        async for _ in stream:
                            pass
        final: dict[str, Any] | None = None
        with contextlib.suppress(NotFound):
            final = await (api.session(self.id) if self.ended else api.delete(self.id, wait=True))
        self._client._open.pop(self.id, None)
        return self._finish(final)

    async def downloads(self) -> list[Download]:
        return [Download.from_json(d) for d in await self._client.api.downloads(self.id)]

    async def download(self, name: str, to: str | os.PathLike[str]) -> Path:
        dest = _destination(name, to)
        out, tmp = _partial(dest)
        try:
            with out:
                async with self._client.api.download(self.id, name) as chunks:
                    async for chunk in chunks:
                        out.write(chunk)  # a chunk to a local file: short enough to do on the loop
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    async def upload(self, data: str | os.PathLike[str] | bytes, *, name: str | None = None) -> str:
        name, raw, path = _source(data, name)
        if path is None:
            return str((await self._client.api.upload(self.id, name, raw or b""))["name"])
        with path.open("rb") as f:
            async def chunks() -> AsyncIterator[bytes]:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    yield chunk
            answer = await self._client.api.upload(self.id, name, chunks(), size=os.fstat(f.fileno()).st_size)
        return str(answer["name"])

    async def tokens(self) -> list[Token]:
        return [Token.from_json(t) for t in await self._client.api.tokens(self.id)]

    async def grant(self, scope: str) -> Token:
        return Token.from_json(await self._client.api.grant(self.id, _scope(scope)))

    async def revoke(self, token: str | Token) -> Token:
        return Token.from_json(await self._client.api.revoke(self.id, _token_ref(token)))

    async def take_over(self) -> TakeOver:
        return TakeOver.from_json(await self._client.api.takeover(self.id))

    async def get_clipboard(self) -> str:
        return await self._client.api.clipboard(self.id)

    async def set_clipboard(self, text: str) -> None:
        await self._client.api.set_clipboard(self.id, text)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            await self.end()
            return
        try:
            await self.end()
        except Exception as e:
            exc.add_note(f"ending session {self.id} failed too: {type(e).__name__}: {e}")


class _Starting:
    """What AsyncClient.session() returns: `await` it for the session, or `async with` it to end the session
    on exit as well."""

    def __init__(self, client: AsyncClient, body: dict[str, Any]) -> None:
        self._client, self._body = client, body
        self._session: AsyncSession | None = None

    async def _start(self) -> AsyncSession:
        s = AsyncSession(self._client, await self._client.api.create_session(self._body))
        self._client._open[s.id] = s
        return s

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._start()
        return self._session

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._session is not None:
            await self._session.__aexit__(exc_type, exc, tb)


class AsyncClient:
    """Client with httpx.AsyncClient. `async with AsyncClient(...)` checks that dispod answers."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, token: str | None = None,
                 config: Config | None = None, timeout: float = TIMEOUT_S) -> None:
        uds, base = _address(url, config)
        self.api = AsyncDispodClient(uds=uds, base_url=base, token=token, timeout=timeout)
        self._open: dict[str, AsyncSession] = {}

    @property
    def where(self) -> str:
        return self.api.where

    async def health(self) -> dict[str, Any]:
        return await self.api.health()

    def session(self, profile: str | None = None, *, url: str | None = None, image: str | None = None,
                command: Sequence[str] | None = None, name: str | None = None, **options: Any) -> _Starting:
        """As Client.session: `s = await d.session(...)`, or `async with d.session(...) as s:`."""
        return _Starting(self, _body(profile=profile, url=url, image=image, command=command, name=name, **options))

    async def attach(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self.api.session(session_id))

    async def sessions(self, all: bool = False) -> list[AsyncSession]:
        return [AsyncSession(self, s) for s in await self.api.sessions(all)]

    async def profiles(self) -> list[dict[str, Any]]:
        return await self.api.profiles()

    async def aclose(self) -> None:
        try:
            failures = []
            for s in list(self._open.values()):
                try:
                    await s.end()
                except DispoError as e:
                    failures.append(e)
            if failures:
                raise failures[0]
        finally:
            await self.api.aclose()

    async def __aenter__(self) -> AsyncClient:
        try:
            await self.health()
        except BaseException:
            await self.api.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            await self.aclose()
            return
        try:
            await self.aclose()
        except Exception as e:
            exc.add_note(f"closing the dispod client failed too: {type(e).__name__}: {e}")
