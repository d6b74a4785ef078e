"""Errors at the HTTP boundary, mapped once: a DispoError (or an HTTP-level refusal) becomes an RFC 9457
application/problem+json answer under /v1 and a one-line text answer elsewhere (the dashboard's and the
viewers' pages are read by people).

    {"type": "https://dispo.dev/problems/InvalidInput", "title": "InvalidInput", "status": 400,
     "detail": "POST /v1/sessions: unknown key(s): colour", "hint": "known keys: ..."}

`title` is always the name of a class in errors.ALL_ERRORS, so a client (client.py, `errors.from_problem`)
raises the same class with the same message and hint. `type` identifies the class; nothing is served there.
A class's `problem_fields` (NotClean's leftovers, ApiError's fault, ...) follow as extension members.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from aiohttp import web

from dispo.errors import Busy, DispoError, InvalidInput, NotFound, PermissionProblem, ServiceError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://dispo.dev/problems/"
RETRY_AFTER_S = 5  # Busy: a session usually ends or fails within seconds of being asked to


class HttpProblem(Exception):
    """An error whose HTTP status or headers differ from its class's (401 with WWW-Authenticate, 413, 415)."""

    def __init__(self, error: DispoError, status: int, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.headers = dict(headers or {})


def from_http(exc: web.HTTPException) -> HttpProblem:
    """aiohttp's own refusals (no route, wrong method, body too large) as dispo errors."""
    detail = exc.text or exc.reason
    cls: type[DispoError] = {401: PermissionProblem, 403: PermissionProblem, 404: NotFound, 429: Busy,
                             503: ServiceError}.get(exc.status, InvalidInput if exc.status < 500 else DispoError)
    if exc.status == 405:
        detail = f"method {exc.method if isinstance(exc, web.HTTPMethodNotAllowed) else ''} not allowed here"
    elif exc.status == 404:
        detail = "no such resource"
    elif exc.status == 413:
        detail = "the request body is too large"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")}
    hint = {405: f"allowed: {headers.get('Allow', '')}", 404: "see GET /v1/openapi.json for the routes"}
    return HttpProblem(cls(" ".join(detail.split()), hint=hint.get(exc.status, "")), exc.status, headers)


def body(error: DispoError, status: int) -> dict[str, object]:
    name = type(error).__name__
    return {"type": TYPE_BASE + name, "title": name, "status": status, "detail": " ".join(error.message.split()),
            "hint": " ".join(error.hint.split()), **error.members()}


def response(problem: HttpProblem, *, api: bool) -> web.Response:
    error, status = problem.error, problem.status
    headers = dict(problem.headers)
    if isinstance(error, Busy):
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    if api:
        return web.Response(status=status, text=json.dumps(body(error, status)), content_type=PROBLEM_JSON,
                            headers=headers)
    return web.Response(status=status, text=f"dispod: {error.one_line()}\n", headers=headers)


def convert(exc: BaseException) -> HttpProblem:
    """Any exception a handler raised, as the problem to answer with (a bug becomes a logged 500)."""
    if isinstance(exc, HttpProblem):
        return exc
    if isinstance(exc, DispoError):
        return HttpProblem(exc, exc.http_status)
    if isinstance(exc, web.HTTPException):
        return from_http(exc)
    log.error("internal error", exc_info=exc)
    return HttpProblem(DispoError(f"internal error: {type(exc).__name__}",
                                  hint="see dispod's log (journalctl -u dispod)"), 500)
