"""The REST API under /v1 (documented in docs/api.md and web/openapi.py, which a test checks against these
routes). Handlers turn HTTP into Runtime calls and nothing else: every check of a session request is in
runtime/request.py, every error is mapped once by guard.answer_problems."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from typing import Any

from aiohttp import web

from dispo import __version__, profiles
from dispo.errors import DispoError, InvalidInput, NotFound, ServiceError
from dispo.names import check_session_id
from dispo.runtime.events import Event, EventKind
from dispo.runtime.live import LiveSession
from dispo.runtime.request import from_json
from dispo.storage import recordings
from dispo.storage.images import ImageStore
from dispo.web import sse, transfers
from dispo.web.guard import json_deadline, json_value, refuse_body
from dispo.web.offloop import blocking
from dispo.web.openapi import document
from dispo.web.problems import HttpProblem
from dispo.web.service import Service
from dispo.web.viewer import Scope

SERVICE = web.AppKey("service", Service)
DELETE_REASON = "stopped through the API (DELETE)"
WAIT_MAX_S = 300.0  # DELETE ?wait=1 answers 202 if teardown takes longer than this


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


FLAG_VALUES = {"1": True, "true": True, "0": False, "false": False}  # what openapi.FLAG documents


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query flag: absent is false; one of FLAG_VALUES, given once, else 400 (a typo such as
    ?wait=yes must not silently mean "don't wait")."""
    given = request.query.getall(name, [])
    if not given:
        return False
    if len(given) > 1 or given[0] not in FLAG_VALUES:
        shown = "&".join(f"{name}={v}" for v in given)[:80]
        raise InvalidInput(f"{request.method} {request.path}: ?{shown} is not a flag value",
                           hint=f"give ?{name}= once, as one of {', '.join(FLAG_VALUES)}")
    return FLAG_VALUES[given[0]]


async def _body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise refuse_body(f"{request.method} {request.path}: the body must be JSON (Content-Type: application/json)")
    try:
        async with asyncio.timeout(json_deadline(request)):  # a body that trickles in is a slow client too
            raw = await request.read()
    except TimeoutError:
        late = InvalidInput(f"{request.method} {request.path}: the body did not arrive in time")
        raise HttpProblem(late, 408) from None
    try:
        return json_value(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{request.method} {request.path}: the body is not valid JSON: {e}",
                           hint='e.g. {"image": "minimal", "command": ["sh", "-c", "echo hi"]}') from None


async def create_session(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if svc.stopping:
        raise ServiceError("dispod is stopping and starts no more sessions", hint="try again once it runs again")
    body = await _body(request)
    req = await blocking(from_json, svc.cfg, body)
    live = await blocking(svc.rt.start, req)
    return _json(live.status(), 201, {"Location": f"/v1/sessions/{live.id}"})


async def list_sessions(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return _json({"sessions": svc.statuses(ended=_flag(request, "all"))})


async def get_session(request: web.Request) -> web.Response:
    return _json(request.app[SERVICE].status(request.match_info["id"]))


async def until_ended(svc: Service, live: LiveSession, timeout: float) -> bool:
    """Wait for the session's end on the loop (a runtime event wakes it; no thread is held meanwhile)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def sink(event: Event) -> None:
        if event.session_id == live.id and event.kind is EventKind.ENDED and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done.set)

    unsubscribe = svc.rt.events.subscribe(sink)
    try:
        if not live.ended:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        if not live.ended:  # the ENDED event is sent just before the session counts as ended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(blocking(live.wait, 5.0), 6.0)
        return live.ended
    finally:
        unsubscribe()


async def delete_session(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    sid = request.match_info["id"]
    wait = _flag(request, "wait")  # a bad flag stops nothing
    try:
        live = svc.live(sid)
    except NotFound:
        if sid in svc.reclaimed:
            return _json(svc.reclaimed[sid])
        raise
    live.stop(DELETE_REASON)
    if wait:
        await until_ended(svc, live, WAIT_MAX_S)
    return _json(live.status(), 200 if live.ended else 202)


async def session_io(request: web.Request) -> web.StreamResponse:
    """Downloads, uploads and the clipboard of a running session (web/transfers.py, runtime/guestio.py)."""
    live = request.app[SERVICE].live(request.match_info["id"])
    tail = request.path.split(f"/{live.id}/", 1)[1]
    answer = await transfers.dispatch(live.io, tail, request)
    if answer is None:
        raise web.HTTPNotFound()
    return answer


async def get_recording(request: web.Request) -> web.StreamResponse:
    """A recorded session's video (storage/recordings.py), once the session ended: from the workspace, so also
    after dispod forgot the session or restarted."""
    svc = request.app[SERVICE]
    sid = check_session_id(request.match_info["id"])
    try:
        rec = await blocking(recordings.find, svc.cfg, sid)
    except NotFound:
        with contextlib.suppress(NotFound):
            live = svc.rt.get(sid)
            if live.request.record and not live.ended:
                raise NotFound(f"session {sid} is still recording",
                               hint="its recording is served once the session has ended (DELETE it, or wait)"
                               ) from None
        raise
    f = await blocking(io.FileIO, rec.video, "r")
    try:
        size = os.fstat(f.fileno()).st_size
        response = web.StreamResponse(headers={
            "Content-Type": recordings.MEDIA_TYPE, "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="dispo-{sid}.webm"', "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store", "Digest": f"sha-256={rec.sha256}"})
        await response.prepare(request)
        while data := await blocking(f.read, 1 << 20):
            await response.write(data)
        await response.write_eof()
        return response
    finally:
        f.close()


def _known_session(request: web.Request) -> str:
    """The id of a session this dispod runs or ran lately (400 for a bad id, 404 for an unknown one). Not
    touched: handing out or revoking links is no use of the session."""
    sid = request.match_info["id"]
    request.app[SERVICE].rt.get(sid)
    return sid


async def create_token(request: web.Request) -> web.Response:
    """A new token of the session, of the scope asked for (view, interact or automate)."""
    viewers = request.app[SERVICE].viewers
    sid = _known_session(request)
    body = await _body(request)
    scopes = ", ".join(s.value for s in Scope)
    if (not isinstance(body, dict) or set(body) != {"scope"} or not isinstance(body["scope"], str)
            or body["scope"] not in {s.value for s in Scope}):
        raise InvalidInput(f"POST {request.path}: the body must be {{\"scope\": S}} with S one of {scopes}",
                           hint='e.g. {"scope": "view"}: watch only')
    grant = viewers.mint(sid, Scope(body["scope"]))
    return _json({"id": grant.id, "token": grant.secret, "scope": grant.scope.value,
                  "url": viewers.url_of(sid, grant)}, 201)


async def list_tokens(request: web.Request) -> web.Response:
    viewers = request.app[SERVICE].viewers
    sid = _known_session(request)
    return _json({"tokens": [g.to_json() for g in viewers.tokens(sid)]})


async def revoke_token(request: web.Request) -> web.Response:
    """Forget a token (by its id or itself) and close the WebSockets opened with it, before answering."""
    viewers = request.app[SERVICE].viewers
    sid = _known_session(request)
    return _json(await viewers.revoke(sid, request.match_info["token"]))


async def take_over(request: web.Request) -> web.Response:
    """A person takes over from the programs: the session's automate tokens revoked, their connections closed,
    and a new interact link (web/viewers.py ServiceViewers.take_over)."""
    viewers = request.app[SERVICE].viewers
    sid = _known_session(request)
    return _json(await viewers.take_over(sid))


def _profile(svc: Service, name: str) -> dict[str, Any]:
    try:
        p = profiles.find(name, svc.cfg.profiles_dir)
    except DispoError as e:  # one broken profile file must not hide the others
        return {"name": name, "image": None, "display": None, "memory_mib": None, "vcpus": None,
                "idle_timeout_s": None, "max_lifetime_s": None, "image_exists": False, "source": None,
                "error": e.one_line()}
    return {"name": p.name, "image": p.image, "display": p.display.value, "memory_mib": p.memory_mib,
            "vcpus": p.vcpus, "idle_timeout_s": p.idle_timeout_s, "max_lifetime_s": p.max_lifetime_s,
            "image_exists": (svc.cfg.images_dir / p.image / "image.json").is_file(), "source": p.source,
            "error": None}


def profile_list(svc: Service) -> list[dict[str, Any]]:
    return [_profile(svc, n) for n in sorted(profiles.list_names(svc.cfg.profiles_dir))]


async def list_profiles(request: web.Request) -> web.Response:
    return _json({"profiles": await blocking(profile_list, request.app[SERVICE])})


def _images(svc: Service) -> list[dict[str, Any]]:
    return [{"name": i.name, "size": i.size, "sha256": i.sha256, "digest": i.digest, "storage": i.storage.value,
             "created": i.created, "bootable": bool(i.kernel), "arch": i.arch, "vmms": list(i.vmms)}
            for i in ImageStore(svc.cfg).list()]


async def list_images(request: web.Request) -> web.Response:
    return _json({"images": await blocking(_images, request.app[SERVICE])})


async def events(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICE]
    session = request.query.get("session")
    if session is not None:
        svc.status(session)  # 400 for a bad id, 404 for an unknown one, before the stream starts

    def snapshot() -> list[Event]:
        if session is None:
            return [Event(EventKind.STATE, s.id, s.state.value, s.status()) for s in svc.rt.sessions()]
        status = svc.status(session)
        if status["state"] == "ended":
            return sse.ended_events(status)
        return [Event(EventKind.STATE, session, str(status["state"]), status)]

    return await sse.stream(request, svc.rt.events.subscribe, snapshot, svc.streams, session=session)


def _pool(svc: Service) -> Any:
    if svc.rt.pool is None:
        raise NotFound("this dispod keeps no warm pool")
    return svc.rt.pool


async def get_pool(request: web.Request) -> web.Response:
    return _json(await blocking(_pool(request.app[SERVICE]).status))


async def fill_pool(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    body = await _body(request)
    count = body.get("count") if isinstance(body, dict) else None
    if isinstance(count, float) and count.is_integer():
        count = int(count)  # JSON has one number type: 3.0 is 3 (as the schema's "integer" says)
    if not isinstance(body, dict) or set(body) != {"count"} or not isinstance(count, int) or isinstance(count, bool):
        raise InvalidInput(f"PUT {request.path}: the body must be {{\"count\": N}} with N a whole number",
                           hint='e.g. {"count": 1}')
    pool = _pool(svc)
    await blocking(pool.fill, request.match_info["name"], count)
    return _json(await blocking(pool.status))


async def drain_pool(request: web.Request) -> web.Response:
    pool = _pool(request.app[SERVICE])
    await blocking(pool.drain, request.match_info["name"])
    return _json(await blocking(pool.status))


async def health(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return _json({"status": "ok", "version": __version__, "sessions": svc.rt.live_count,
                  "max_sessions": svc.rt.max_sessions, "machinery": svc.rt.machinery.name,
                  "uptime_s": round(time.time() - svc.started, 1),
                  # Web viewers need TCP (a browser cannot open a unix socket): the CLI runs web sessions
                  # in-process when this is false.
                  "viewers": svc.viewers.base.startswith("http://")})


async def openapi(request: web.Request) -> web.Response:
    return _json(document())


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/sessions", create_session),
        web.get("/v1/sessions", list_sessions, allow_head=False),
        web.get("/v1/sessions/{id}", get_session, allow_head=False),
        web.delete("/v1/sessions/{id}", delete_session),
        web.get("/v1/sessions/{id}/downloads", session_io, allow_head=False),
        web.get("/v1/sessions/{id}/downloads/{name}", session_io, allow_head=False),
        web.post("/v1/sessions/{id}/uploads", session_io),
        web.get("/v1/sessions/{id}/clipboard", session_io, allow_head=False),
        web.put("/v1/sessions/{id}/clipboard", session_io),
        web.get("/v1/sessions/{id}/recording", get_recording, allow_head=False),
        web.post("/v1/sessions/{id}/tokens", create_token),
        web.get("/v1/sessions/{id}/tokens", list_tokens, allow_head=False),
        web.delete("/v1/sessions/{id}/tokens/{token}", revoke_token),
        web.post("/v1/sessions/{id}/takeover", take_over),
        web.get("/v1/pool", get_pool, allow_head=False),
        web.put("/v1/pool/{name}", fill_pool),
        web.delete("/v1/pool/{name}", drain_pool),
        web.get("/v1/profiles", list_profiles, allow_head=False),
        web.get("/v1/images", list_images, allow_head=False),
        web.get("/v1/events", events, allow_head=False),
        web.get("/v1/openapi.json", openapi, allow_head=False),
        web.get("/v1/health", health, allow_head=False),
    ]
