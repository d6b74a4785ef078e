"""The dashboard at /ui/<token>/: start a session per profile, see and end live sessions, open viewers.

Plain HTML rendered here (the profiles, so the page works at once and says what it offers), one small
script that keeps the session list current from the event stream, and a strict CSP: no inline script or
style, nothing loaded from elsewhere, no framing. The script calls the same /v1 API as every other client,
with the token from its own path (Authorization header; ?access_token= for the event stream alone, which
EventSource cannot give headers).
"""

from __future__ import annotations

import string
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web

from dispo.errors import PermissionProblem
from dispo.web.api import SERVICE, profile_list
from dispo.web.guard import authenticated, token_ok
from dispo.web.offloop import blocking

UI_PREFIX = "/ui"
_HERE = Path(__file__).parent
_PAGE = string.Template((_HERE / "dashboard.html").read_text())
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "icon.svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _profile_form(p: dict[str, Any]) -> str:
    name = escape(str(p["name"]))
    field_id = f"url-{name}"
    if p["error"]:
        note = f'<p class="note">This profile cannot be used: {escape(str(p["error"]))}</p>'
    elif not p["image_exists"]:
        note = (f'<p class="note">Its image <code>{escape(str(p["image"]))}</code> is not there yet: '
                f'<code>dispo image build {escape(str(p["image"]))}</code></p>')
    else:
        note = ""
    disabled = " disabled" if note else ""
    url_field = ""
    if p["display"] == "web":
        url_field = (f'<label for="{field_id}">URL to open (optional)</label>'
                     f'<input type="url" id="{field_id}" name="url" placeholder="https://" autocomplete="off"'
                     f' spellcheck="false" maxlength="4096"{disabled}>')
    details = "" if p["error"] else (f'<p class="meta">{escape(str(p["image"]))}, {p["memory_mib"]} MiB, '
                                     f'{p["vcpus"]} vCPU, display {escape(str(p["display"]))}</p>')
    return (f'<li><form class="start" data-profile="{name}"><h3>{name}</h3>{details}{url_field}'
            f'<button type="submit"{disabled}>Start {name}</button>{note}</form></li>')


def render(profiles: list[dict[str, Any]]) -> str:
    forms = "\n".join(_profile_form(p) for p in profiles) or "<li>No profiles.</li>"
    return _PAGE.substitute(profiles=forms)


async def page(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICE]
    if not token_ok(request.match_info["token"], svc.token):
        raise PermissionProblem("this dashboard link has a wrong or old access token",
                                hint="open the link dispod printed at its start; the current one is in "
                                     "<state_dir>/dispod.url (root-only)")
    authenticated(request)
    tail = request.match_info.get("tail")
    if tail is None:  # /ui/TOKEN: the page's relative links need the slash
        raise web.HTTPPermanentRedirect(f"{UI_PREFIX}/{request.match_info['token']}/")
    if tail == "":
        profiles = await blocking(profile_list, svc)
        return web.Response(text=render(profiles), content_type="text/html", headers={"Content-Security-Policy": CSP})
    if tail in _ASSETS:
        return web.Response(body=(_HERE / tail).read_bytes(), content_type=_ASSETS[tail])
    raise web.HTTPNotFound(text="dispod: no such page\n")


def routes() -> list[web.RouteDef]:
    return [web.get(UI_PREFIX + "/{token}", page, allow_head=False),
            web.get(UI_PREFIX + "/{token}/{tail:[^/]*}", page, allow_head=False)]
