"""A person and programs on one session (issue 22), on the fake machinery (tests/fakes.py, tests/fakecdp.py):

- take-over: POST /v1/sessions/ID/takeover (the SDK's take_over(), `dispo takeover ID`) revokes every automate
  token, closes their automation connections before it answers, leaves the people's view and interact links,
  and hands out a new interact link that works;
- the SDK's token calls (tokens, grant, revoke; sync and async), with dispod's errors as their own classes;
- embedding: a live view's page may be framed only by the pages [service] frame_ancestors names; by default
  by none, and dispod's other answers never.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

import dispo
from dispo import config
from dispo.cli import takeover as takeover_cli
from dispo.config import Config
from dispo.errors import ConfigError, Conflict, InvalidInput, NotFound
from tests.fakeworld import SAFETY_S, Running, ask, cfg, mint, serving, svc, tokens, wait_state
from tests.fakeworld import run_async as run
from tests.fakeworld import start_session as start

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

pytestmark = pytest.mark.skipif(not Path("/usr/share/novnc/vnc.html").exists(), reason="needs Debian package novnc")





# -- take-over ----------------------------------------------------------------------------------------------
def test_take_over_revokes_the_programs_and_leaves_the_person_the_only_driver(svc: Running) -> None:
    created = start(svc, automation=True)
    sid, url = created["id"], created["cdp_url"]
    extra = mint(svc, sid, "automate")
    watcher = mint(svc, sid, "view")

    async def programs() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as one, \
                http.ws_connect(extra["url"]) as two:
            assert await ask(one, "open?") == "2"
            answer = await asyncio.to_thread(svc.uds.takeover, sid)
            for ws in (one, two):  # closed before the answer came
                msg = await ws.receive(SAFETY_S)
                assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4403), msg
            for gone in (url, extra["url"]):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(gone)
                assert refused.value.status == 404
            return answer

    answer = run(programs())
    assert answer["connections"] == 2, answer
    assert sorted(t["scope"] for t in answer["revoked"]) == ["automate", "automate"]
    assert extra["id"] in {t["id"] for t in answer["revoked"]}
    assert answer["scope"] == "interact" and answer["url"] == f"{svc.base}/viewer/{sid}/{answer['token']}/"
    left = tokens(svc, sid)
    assert "automate" not in {t["scope"] for t in left}
    assert {watcher["id"], answer["id"]} <= {t["id"] for t in left}  # people's links stay; the new one is there
    with svc.tcp(auth=False) as http:
        assert http.get(answer["url"]).status_code == 200
        assert http.get(answer["url"] + "status").json()["display"] is True
        assert http.get(watcher["url"]).status_code == 200
    assert svc.uds.session(sid)["state"] == "running"  # the session goes on, now the person's


def test_take_over_of_a_session_without_programs_or_without_a_viewer(svc: Running) -> None:
    plain = start(svc)
    answer = svc.uds.takeover(plain["id"])
    assert answer["revoked"] == [] and answer["connections"] == 0 and answer["url"]
    headless = svc.uds.create_session({"image": "minimal", "command": ["sleep", "600"]})
    wait_state(svc.uds, headless["id"], "running")
    with pytest.raises(Conflict, match="has no viewer"):
        svc.uds.takeover(headless["id"])
    with pytest.raises(NotFound):
        svc.uds.takeover("0123abcd")
    with svc.raw_uds() as http:
        r = http.post("/v1/sessions/not-an-id!/takeover")
    assert r.status_code in (400, 404), r.text


def test_dispo_takeover_prints_the_persons_link(svc: Running, cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    created = start(svc, automation=True)
    assert takeover_cli.cmd_takeover(argparse.Namespace(id=created["id"], json=False), cfg) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{svc.base}/viewer/{created['id']}/") and out.count("\n") == 1, out
    assert "revoked 1 automate token(s), closed 0 automation connection(s)" in err, err
    assert takeover_cli.cmd_takeover(argparse.Namespace(id=created["id"], json=True), cfg) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == []
    with pytest.raises(InvalidInput):
        takeover_cli.cmd_takeover(argparse.Namespace(id="../x", json=False), cfg)


# -- the SDK's tokens -------------------------------------------------------------------------------------------
def test_sdk_grants_lists_revokes_and_takes_over(svc: Running, cfg: Config) -> None:
    with dispo.connect(config=cfg) as d:
        with d.session("chromium", automation=True) as s:
            s.wait_ready()
            first = s.tokens()
            assert [t.scope for t in first] == ["interact", "automate"] and all(t.token is None for t in first)
            view = s.grant("view")
            assert view.scope == "view" and view.token and view.url == f"{svc.base}/viewer/{s.id}/{view.token}/"
            automate = s.grant("automate")
            assert automate.url == f"ws://{svc.base.removeprefix('http://')}/automation/{s.id}/{automate.token}/cdp"
            assert {t.id for t in s.tokens()} == {t.id for t in first} | {view.id, automate.id}
            assert s.revoke(view).id == view.id              # a Token: revoked by its id
            assert s.revoke(str(automate.token)).id == automate.id  # or the token itself
            with pytest.raises(NotFound, match="no such token"):
                s.revoke(view)
            with pytest.raises(InvalidInput, match="not a token scope"):
                s.grant("admin")
            taken = s.take_over()
            assert [t.scope for t in taken.revoked] == ["automate"] and taken.connections == 0
            assert taken.viewer.scope == "interact" and taken.viewer.url and str(taken.viewer.token) in taken.viewer.url
            assert "automate" not in {t.scope for t in s.tokens()}
            assert str(view.token) not in repr(view) and str(view.token) not in repr(taken)
        with pytest.raises(Conflict):  # ended: no new tokens
            s.grant("view")


def test_async_sdk_grants_lists_revokes_and_takes_over(svc: Running, cfg: Config) -> None:
    async def program() -> None:
        async with dispo.AsyncClient(config=cfg) as d, d.session("chromium", automation=True) as s:
            await s.wait_ready()
            view = await s.grant("interact")
            assert view.url and view.token
            assert view.id in {t.id for t in await s.tokens()}
            assert (await s.revoke(view.id)).id == view.id
            taken = await s.take_over()
            assert len(taken.revoked) == 1 and taken.viewer.scope == "interact"
            with pytest.raises(InvalidInput):
                await s.grant("everything")
            with pytest.raises(NotFound):
                await s.revoke("0a1b2c3d4e5f")

    run(program())


# -- embedding a live view -----------------------------------------------------------------------------------
@pytest.fixture
def embedding(cfg: Config) -> Iterator[Running]:
    service = dataclasses.replace(cfg.service, frame_ancestors="https://app.example.org 'self'")
    with serving(dataclasses.replace(cfg, service=service)) as running:
        yield running


def _headers(svc: Running, url: str) -> dict[str, str]:
    with svc.tcp(auth=False) as http:
        r = http.get(url)
    assert r.status_code == 200, r.text
    return dict(r.headers)


def test_a_live_view_is_not_embeddable_by_default(svc: Running) -> None:
    created = start(svc)
    page = _headers(svc, created["viewer_url"])
    assert "frame-ancestors 'none'" in page["content-security-policy"]
    assert page["x-frame-options"] == "SAMEORIGIN"
    novnc = _headers(svc, created["viewer_url"] + "vnc.html")  # framed by the viewer page alone
    assert novnc["x-frame-options"] == "SAMEORIGIN" and "content-security-policy" not in novnc


def test_frame_ancestors_from_config_lets_those_pages_embed_the_live_view_alone(embedding: Running) -> None:
    svc = embedding
    created = start(svc)
    view = mint(svc, created["id"], "view")
    for url in (created["viewer_url"], view["url"]):
        page = _headers(svc, url)
        assert "frame-ancestors https://app.example.org 'self'" in page["content-security-policy"], page
        assert "x-frame-options" not in page  # it could not name the origin, and would forbid what the CSP allows
        # noVNC's page, framed by the viewer page: every ancestor is checked, so it names both.
        novnc = _headers(svc, url + "vnc.html")
        assert "frame-ancestors 'self' https://app.example.org" in novnc["content-security-policy"], novnc
        assert "x-frame-options" not in novnc
    # The viewer's other answers and dispod's own pages stay unframeable.
    assert _headers(svc, created["viewer_url"] + "status")["x-frame-options"] == "SAMEORIGIN"
    with svc.tcp() as http:
        api = http.get("/v1/health")
    assert api.headers["x-frame-options"] == "SAMEORIGIN"


@pytest.mark.parametrize("value", ["", "'self'", "https://app.example.org", "http://localhost:8080 'self'",
                                   "https://*.example.org:443"])
def test_frame_ancestors_takes_origins_and_self(tmp_path: Path, value: str) -> None:
    path = tmp_path / "dispo.toml"
    path.write_text(f"[service]\nframe_ancestors = {json.dumps(value)}\n")
    assert config.load(path, env={}).service.frame_ancestors == value


@pytest.mark.parametrize("value", ["*", "https:", "'none'", "https://a.example; script-src *", "data:",
                                   "https://a.example,https://b.example", "'unsafe-inline'", "example.org"])
def test_frame_ancestors_refuses_what_lets_any_page_frame_or_is_not_a_source(tmp_path: Path, value: str) -> None:
    path = tmp_path / "dispo.toml"
    path.write_text(f"[service]\nframe_ancestors = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as e:
        config.load(path, env={})
    assert "service.frame_ancestors" in e.value.message and "\n" not in e.value.message
    assert e.value.hint == f"fix [service] frame_ancestors in {path}"



class _Site:
    """Another site: one page on its own origin (127.0.0.1, another port) that frames a URL given later."""

    def __init__(self) -> None:
        self.framed = ""
        site = self

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f'<!doctype html><title>site</title><iframe id="live" src="{site.framed}"></iframe>'.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("allowed", [True, False])
def test_a_browser_shows_a_live_view_in_another_sites_frame_only_when_configured(cfg: Config, allowed: bool) -> None:
    if not shutil.which("chromium"):
        pytest.skip("needs Debian package chromium")
    from playwright.sync_api import sync_playwright

    site = _Site()
    service = dataclasses.replace(cfg.service, frame_ancestors=site.origin if allowed else "")
    try:
        with serving(dataclasses.replace(cfg, service=service)) as svc, sync_playwright() as p:
            site.framed = mint(svc, start(svc)["id"], "view")["url"]
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            try:
                page = browser.new_page()
                page.goto(site.origin, wait_until="load")  # the frame has loaded, or failed to
                live = page.frame_locator("#live")
                if allowed:  # the viewer page, and noVNC's page inside it with the screen
                    live.frame_locator("#vnc").locator("canvas").wait_for(state="visible", timeout=SAFETY_S * 1000)
                else:
                    (framed,) = page.main_frame.child_frames
                    assert framed.url != site.framed and framed.child_frames == [], framed.url
                    assert live.locator("#vnc").count() == 0
            finally:
                browser.close()
    finally:
        site.close()
