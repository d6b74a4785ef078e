"""The dashboard at /ui/<token>/: start a session per profile, see and end live sessions, open viewers.

Plain HTML rendered here (the profiles, so the page works at once and says what it offers), one small
script that keeps the session list current from the event stream, and a strict CSP: no inline script or
style, nothing loaded from elsewhere, no framing. The script calls the same /v1 API as every other client,
with the token from its own path (Authorization header; ?access_token= for the event stream alone, which
EventSource cannot give headers).
"""

from __future__ import annotations

import json
import string
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web

from dispo import receipt
from dispo.errors import DispoError, NotFound, PermissionProblem
from dispo.names import check_session_id
from dispo.runtime.request import build
from dispo.runtime.warm import template_for
from dispo.web.api import SERVICE, profile_list
from dispo.web.guard import CLUSTER_SECRET, authenticated, bearer, token_ok
from dispo.web.offloop import blocking
from dispo.web.service import Service
from dispo.web.viewer import STEP_TEXT

UI_PREFIX = "/ui"
_HERE = Path(__file__).parent
_PAGE = string.Template((_HERE / "dashboard.html").read_text())
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "icon.svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _facts(svc: Service, name: str) -> dict[str, Any]:
    """What a session of profile `name` would get beyond its numbers: warm or cold (a current template, and
    why not), pooled guests ready now, and what may cross between guest and user (sound, files, clipboard)."""
    try:
        req = build(svc.cfg, profile=name)
    except DispoError:
        return {}
    t, why = template_for(svc.cfg, req)
    ready = 0
    if svc.rt.pool is not None:
        ready = sum(int(slot.get("ready") or 0) for slot in svc.rt.pool.status(name)["slots"])
    f = req.features
    clip = [w for w, on in (("to the guest", f.clipboard_to_guest), ("from the guest", f.clipboard_from_guest)) if on]
    return {"warm": t is not None, "why_cold": why, "pool_ready": ready, "sound": f.audio,
            "downloads": f.downloads, "uploads": f.uploads, "clipboard": " and ".join(clip) or "off"}


def _profile_form(p: dict[str, Any], facts: dict[str, Any]) -> str:
    name = escape(str(p["name"]))
    field_id = f"url-{name}"
    if p["error"]:
        note = f'<p class="note">This profile cannot be used: {escape(str(p["error"]))}</p>'
    elif not p["image_exists"]:
        note = (f'<p class="note">Its image <code>{escape(str(p["image"]))}</code> is not built yet: run '
                f'<code>dispo image build {escape(str(p["image"]))}</code></p>')
    else:
        note = ""
    disabled = " disabled" if note else ""
    url_field = ""
    if p["display"] == "web":
        url_field = (f'<label for="{field_id}">URL to open (optional)</label>'
                     f'<input type="url" id="{field_id}" name="url" placeholder="https://" autocomplete="off"'
                     f' spellcheck="false" maxlength="4096"{disabled}>')
    details = ""
    if not p["error"]:
        items = [f'{p["memory_mib"]} MiB memory, {p["vcpus"]} vCPU{"s" if p["vcpus"] != 1 else ""}',
                 f'image {escape(str(p["image"]))}, display {escape(str(p["display"]))}']
        if facts:
            if facts["pool_ready"]:
                items.append(f'<strong>Warm start</strong>: {facts["pool_ready"]} guest(s) ready in the pool')
            elif facts["warm"]:
                items.append("<strong>Warm start</strong>: restored from its template")
            else:
                items.append(f'Cold start (boots): no template yet. To start in seconds, run '
                             f'<code>dispo template build {name}</code>')
            items.append(f'Sound {"on" if facts["sound"] else "off"}; downloads {"on" if facts["downloads"] else "off"}'
                         f'; uploads {"on" if facts["uploads"] else "off"}; clipboard {escape(facts["clipboard"])}')
        details = '<ul class="facts">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
    return (f'<li><form class="start" data-profile="{name}"><h3>{name}</h3>{details}{url_field}'
            f'<button type="submit"{disabled}>Start {name}</button>{note}</form></li>')


HISTORY_MAX = 20  # ended sessions the page lists (dashboard.js keeps the same number)


def render(profiles: list[dict[str, Any]], facts: dict[str, dict[str, Any]] | None = None) -> str:
    forms = "\n".join(_profile_form(p, (facts or {}).get(p["name"], {})) for p in profiles) or "<li>No profiles.</li>"
    # The viewer's words for the bring-up steps, so both pages say the same (a data attribute: no inline script).
    words = escape(json.dumps(STEP_TEXT, separators=(",", ":")), quote=True)
    return _PAGE.substitute(profiles=forms, step_words=words, history_max=HISTORY_MAX)


def check_link(request: web.Request, token: str) -> None:
    """The path's token is the dashboard's (PermissionProblem, a 403, otherwise)."""
    if not token_ok(request.match_info["token"], token):
        raise PermissionProblem("this dashboard link has a wrong or old access token",
                                hint="open the link dispod printed at its start; the current one is in "
                                     "<state_dir>/dispod.url (root-only)")
    authenticated(request)


def _checked(request: web.Request) -> Service:
    """The service, once the path's token is the dashboard's, or the request comes from the cluster's gateway
    (its bearer is the cluster secret: the gateway serves the dashboard and asks its node for a session's
    receipt and thumbnail)."""
    svc = request.app[SERVICE]
    secret = request.app.get(CLUSTER_SECRET, "")
    if secret and (given := bearer(request)) and token_ok(given, secret):
        authenticated(request)
        return svc
    check_link(request, svc.token)
    return svc


def asset(name: str) -> web.Response | None:
    """The page's script, style sheet or icon, or None for any other name."""
    if name not in _ASSETS:
        return None
    return web.Response(body=(_HERE / name).read_bytes(), content_type=_ASSETS[name])


async def page(request: web.Request) -> web.StreamResponse:
    svc = _checked(request)
    tail = request.match_info.get("tail")
    if tail is None:  # /ui/TOKEN: the page's relative links need the slash
        raise web.HTTPPermanentRedirect(f"{UI_PREFIX}/{request.match_info['token']}/")
    if tail == "":
        profiles = await blocking(profile_list, svc)
        facts = {p["name"]: await blocking(_facts, svc, p["name"]) for p in profiles if p["image_exists"]}
        return web.Response(text=render(profiles, facts), content_type="text/html",
                            headers={"Content-Security-Policy": CSP})
    if (found := asset(tail)) is not None:
        return found
    raise web.HTTPNotFound(text="dispod: no such page\n")


def _receipt_html(sid: str, data: dict[str, Any] | None) -> str:
    """A session's disposal receipt for people: clean or not, what was checked, the image, what is left."""
    title = f"Disposal receipt of session {escape(sid)}"
    if data is None:
        body = ("<p>No receipt was written for this session (it made nothing on the host, or its receipt was "
                "removed): there is nothing to show.</p>")
    else:
        clean = bool(data.get("clean"))
        verdict = ("Clean: nothing of the session is left." if clean
                   else "Not clean: something of the session is still there.")
        image = {True: "unchanged", False: "CHANGED", None: "not reached"}.get(data.get("image_unchanged"), "?")
        items = [f"Host objects checked: {int(data.get('checked') or 0)}", f"The image: {image}"]
        if data.get("end_reason"):
            items.append(f"How it ended: {escape(str(data['end_reason']))}")
        if data.get("exit_status") is not None:
            items.append(f"Exit status: {int(data['exit_status'])}")
        if data.get("teardown_s") is not None:
            items.append(f"Teardown took {float(data['teardown_s']):.1f} s")
        kept = "".join(f"<li>{escape(str(k))}</li>" for k in data.get("kept") or [])
        left = "".join(f"<li>{escape(str(k))}</li>" for k in data.get("leftovers") or [])
        objects = "".join(f"<li><code>{escape(str(k))}</code></li>" for k in data.get("objects") or [])
        body = (f'<p class="verdict" id="verdict">{verdict}</p><ul>'
                + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
                + (f"<h2>Kept on purpose</h2><ul>{kept}</ul>" if kept else "")
                + (f"<h2>Still there</h2><ul>{left}</ul>" if left else "")
                + (f"<h2>What was checked</h2><ul>{objects}</ul>" if objects else ""))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{title}</title><link rel="stylesheet" href="../dashboard.css"></head><body><main>'
            f'<h1>{title}</h1>{body}<p><a href="../">Back to the sessions</a></p></main></body></html>')


async def receipt_page(request: web.Request) -> web.StreamResponse:
    """/ui/TOKEN/receipt/ID: the receipt, from the session's own record or from receipts.jsonl (it outlives
    the session's entry in the runtime)."""
    svc = _checked(request)
    sid = request.match_info["id"]
    check_session_id(sid)
    data = await blocking(receipt.find, svc.cfg, sid)
    return web.Response(text=_receipt_html(sid, data), content_type="text/html",
                        headers={"Content-Security-Policy": CSP})


async def thumb_page(request: web.Request) -> web.StreamResponse:
    """/ui/TOKEN/thumb/ID: a PNG of a running session's screen, at most thumbs.WIDTH wide, a few seconds old at
    most (web/thumbs.py); 404 when it shows none (no web display, not up yet, ended, or its display is silent)."""
    svc = _checked(request)
    sid = request.match_info["id"]
    check_session_id(sid)
    path = svc.viewers.display_socket(sid)
    svc.thumbs.keep_only({s.id for s in svc.rt.sessions()})
    image = await blocking(svc.thumbs.get, sid, path) if path is not None else None
    if image is None:
        raise NotFound(f"session {sid} shows no screen now",
                       hint="it has no web display, its display is not up yet, or it ended")
    return web.Response(body=image, content_type="image/png",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


def routes() -> list[web.RouteDef]:
    return [web.get(UI_PREFIX + "/{token}/receipt/{id}", receipt_page, allow_head=False),
            web.get(UI_PREFIX + "/{token}/thumb/{id}", thumb_page, allow_head=False),
            web.get(UI_PREFIX + "/{token}", page, allow_head=False),
            web.get(UI_PREFIX + "/{token}/{tail:[^/]*}", page, allow_head=False)]
