"""The automation endpoint (web/automation.py) on fake machinery: dispod served from a thread, its fake guest's
display process also serving a fake browser's debugging endpoint on the forwarded socket (tests/fakecdp.py).

What is held: a session with automation answers with a cdp_url that relays both ways and takes several clients;
a session without has none and its route answers 404, as do a wrong token and an unknown session; messages over
the cap, either way, end that connection on both sides; connections per session are bounded; a client that
leaves closes its browser side; the session's end closes every relay and the URL then answers 404; the
browser's /json/version answer is the guest's and is read capped; the request's checks and the plan: a boot, or
a restore (or a pooled guest) of an automation template only, whose forward to the browser is made at restore.
Its tokens are the session's automate tokens (web/viewers.py): the cdp_url's is listed and revocable, minted
ones open the relay, view and interact ones are refused, and revoking one closes its relays and its URL.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import WSMsgType, web

from dispo import guest
from dispo.cli import run as run_cli
from dispo.config import Config
from dispo.errors import Conflict, GuestIOError, InvalidInput, NotFound
from dispo.runtime import build, from_json
from dispo.runtime import plan as planning
from dispo.runtime.steps import Origin
from dispo.storage.templates import TemplateStore
from dispo.web import automation
from dispo.web.viewers import ServiceViewers
from tests import fakes
from tests.fakeworld import SAFETY_S, Running, ask, cfg, make_template, mint, run_parser, svc, tokens
from tests.fakeworld import run_async as run
from tests.fakeworld import start_session as start

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)


def relays_then_ends(svc: Running, created: dict[str, Any]) -> None:
    """The session's cdp_url relays to its (fake) browser; then the session is ended."""
    async def client() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(created["cdp_url"]) as ws:
            assert await ask(ws, '{"id": 1}') == '{"id": 1}'

    run(client())
    svc.uds.delete(created["id"], wait=True)


async def until_open(ws: aiohttp.ClientWebSocketResponse, count: int) -> None:
    """Until the fake browser has `count` connections open (a relay closes its browser side just after its
    client's)."""
    deadline = time.monotonic() + SAFETY_S
    while (got := await ask(ws, "open?")) != str(count):
        assert time.monotonic() < deadline, f"{got} browser connections open, not {count}"
        await asyncio.sleep(0.05)


async def connect(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    """A connection once a slot is free (a client that just left frees its own a moment later)."""
    deadline = time.monotonic() + SAFETY_S
    while True:
        try:
            return await http.ws_connect(url)
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 429 and time.monotonic() < deadline, e
            await asyncio.sleep(0.05)



def test_a_session_with_automation_relays_to_its_browser_for_several_clients(svc: Running) -> None:
    created = start(svc, automation=True)
    url = created["cdp_url"]
    assert url.startswith(f"ws://{svc.base.removeprefix('http://')}/automation/{created['id']}/")
    assert svc.uds.session(created["id"])["cdp_url"] == url and created["bidi_url"] is None

    async def clients() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url) as one, http.ws_connect(url) as two:
                assert await ask(one, '{"id": 1, "method": "Browser.getVersion"}') == \
                    '{"id": 1, "method": "Browser.getVersion"}'
                await two.send_bytes(b"\x00\x01")
                assert (await two.receive(SAFETY_S)).data == b"\x00\x01"
                assert await ask(one, "open?") == "2"  # each client has its own connection to the browser
            # Both left: their browser sides are closed too. A client that comes back finds the browser.
            async with http.ws_connect(url) as again:
                await until_open(again, 1)

    run(clients())


def test_a_session_without_automation_has_no_url_and_its_route_is_404(svc: Running) -> None:
    created = start(svc)
    assert created["cdp_url"] is None and created["bidi_url"] is None
    with svc.tcp(auth=False) as http:
        for path in (f"/automation/{created['id']}/{'x' * 32}/cdp", "/automation/0123abcd/nothing/cdp"):
            answer = http.get(path, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                             "Sec-WebSocket-Version": "13"})
            assert answer.status_code == 404, answer.text
            assert "no automation endpoint" in answer.text


def test_a_wrong_token_or_protocol_is_refused_and_reaches_no_browser(svc: Running) -> None:
    created = start(svc, automation=True)
    url = created["cdp_url"]
    token = url.split("/")[-2]
    wrong = [url.replace(token, token[:-1] + ("A" if token[-1] != "A" else "B")), url[:-3] + "bidi"]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http:
            for bad in wrong:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(bad)
                assert refused.value.status == 404
            async with http.ws_connect(url) as ws:
                assert await ask(ws, "open?") == "1"  # the refused ones reached no browser
            # Not a WebSocket: said so, in one line.
            async with http.get(url.replace("ws://", "http://")) as plain:
                assert plain.status == 400 and "WebSocket endpoint" in await plain.text()

    run(clients())


def test_messages_over_the_cap_end_the_connection_on_both_sides(svc: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(automation, "MAX_MESSAGE_BYTES", 1 << 20)
    url = start(svc, automation=True)["cdp_url"]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as watcher:
            # The client sends too much: dispod stops reading at the cap and closes both sides.
            async with http.ws_connect(url, max_msg_size=0) as big:
                assert await ask(big, "x" * 1000) == "x" * 1000  # under the cap: relayed
                await big.send_str("x" * (2 << 20))
                msg = await big.receive(SAFETY_S)
                assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
            await until_open(watcher, 1)
            # The guest sends too much: the same.
            async with http.ws_connect(url, max_msg_size=0) as victim:
                await victim.send_str(f"big {2 << 20}")
                msg = await victim.receive(SAFETY_S)
                assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
            await until_open(watcher, 1)
            assert len(await ask(watcher, f"big {(1 << 20) - 100}")) == (1 << 20) - 100

    run(clients())


def test_connections_per_session_are_bounded(svc: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(automation, "MAX_CLIENTS", 2)
    url = start(svc, automation=True)["cdp_url"]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url) as one, http.ws_connect(url) as two:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url)
                assert refused.value.status == 429
                assert await ask(one, "open?") == "2" and await ask(two, "ping") == "ping"
            async with await connect(http, url) as three:  # a slot is free again once a client left
                await until_open(three, 1)

    run(clients())


def test_the_browser_closing_closes_the_client(svc: Running) -> None:
    url = start(svc, automation=True)["cdp_url"]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_str("close")
            msg = await ws.receive(SAFETY_S)
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg

    run(clients())


def test_the_sessions_end_closes_every_relay_and_its_url(svc: Running) -> None:
    created = start(svc, automation=True)
    url, sid = created["cdp_url"], created["id"]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url) as one, http.ws_connect(url) as two:
                assert await ask(one, "open?") == "2"
                await asyncio.to_thread(svc.uds.delete, sid, True)
                for ws in (one, two):
                    msg = await ws.receive(SAFETY_S)
                    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert refused.value.status == 404
        assert svc.dispod.automation.open_connections(sid) == 0

    run(clients())
    assert svc.uds.session(sid)["state"] == "ended"


def test_automation_traffic_keeps_an_idle_session_alive(svc: Running) -> None:
    created = start(svc, automation=True, idle_timeout_s=2)

    async def client() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(created["cdp_url"]) as ws:
            for _ in range(8):  # twice the idle timeout, used all along
                assert await ask(ws, "ping") == "ping"
                await asyncio.sleep(0.5)
                assert (await asyncio.to_thread(state_of, svc, created["id"]))["state"] == "running"

    run(client())
    # Left alone, it ends idle (asked through the listing, which is no use of a session: GET /v1/sessions/ID is).
    deadline = time.monotonic() + SAFETY_S
    while (status := state_of(svc, created["id"]))["state"] != "ended":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert "idle" in status["end_reason"]


def state_of(svc: Running, sid: str) -> dict[str, Any]:
    """A session's status without touching it (the listing; GET /v1/sessions/ID counts as use)."""
    return next(s for s in svc.uds.sessions(all=True) if s["id"] == sid)



# -- its tokens: the session's automate tokens (web/viewers.py) ------------------------------------------------


def test_the_urls_token_is_an_automate_token_and_minted_ones_open_the_relay(svc: Running) -> None:
    created = start(svc, automation=True)
    sid, url = created["id"], created["cdp_url"]
    assert [t["scope"] for t in tokens(svc, sid)] == ["interact", "automate"]  # viewer_url's, cdp_url's
    minted = mint(svc, sid, "automate")
    assert minted["url"] == url.replace(url.split("/")[-2], minted["token"])  # the same endpoint, its own token
    assert [t["scope"] for t in tokens(svc, sid)] == ["interact", "automate", "automate"]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(minted["url"]) as ws:
            assert await ask(ws, "ping") == "ping"
            assert await ask(ws, "open?") == "1"
            counted = {t["id"]: t["connections"] for t in await asyncio.to_thread(tokens, svc, sid)}
            assert counted[minted["id"]] == 1 and sum(counted.values()) == 1

    run(clients())
    # Neither is a viewer token: the viewer refuses them, as before.
    with svc.tcp(auth=False) as http:
        for token in (url.split("/")[-2], minted["token"]):
            r = http.get(f"{svc.base}/viewer/{sid}/{token}/")
            assert r.status_code == 403 and "automate token" in r.text, r.text


def test_view_and_interact_tokens_are_refused_by_the_automation_route(svc: Running) -> None:
    created = start(svc, automation=True)
    sid, url = created["id"], created["cdp_url"]
    others = [mint(svc, sid, "view")["token"], mint(svc, sid, "interact")["token"],
              created["viewer_url"].rstrip("/").rsplit("/", 1)[1]]

    async def clients() -> None:
        async with aiohttp.ClientSession() as http:
            for token in others:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url.replace(url.split("/")[-2], token))
                assert refused.value.status == 404
            async with http.ws_connect(url) as ws:
                assert await ask(ws, "open?") == "1"  # the refused ones reached no browser

    run(clients())


@pytest.mark.parametrize("by", ["token", "id"])
def test_revoking_the_urls_token_closes_its_relays_and_refuses_it_from_then_on(svc: Running, by: str) -> None:
    created = start(svc, automation=True)
    sid, url = created["id"], created["cdp_url"]
    first = next(t for t in tokens(svc, sid) if t["scope"] == "automate")
    kept = mint(svc, sid, "automate")

    async def clients() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(kept["url"]) as watcher:
            async with http.ws_connect(url) as one, http.ws_connect(url) as two:
                assert await ask(one, "open?") == "3"
                async with httpx.AsyncClient(
                        transport=httpx.AsyncHTTPTransport(uds=str(svc.dispod.paths.socket))) as api:
                    which = first["id"] if by == "id" else url.split("/")[-2]
                    r = await api.delete(f"http://dispod/v1/sessions/{sid}/tokens/{which}")
                assert r.status_code == 200, r.text
                assert r.json()["id"] == first["id"] and r.json()["connections"] == 2  # the cdp_url's own token
                for ws in (one, two):
                    msg = await ws.receive(SAFETY_S)
                    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4403), msg
            await until_open(watcher, 1)  # their browser sides are closed too; the other token's stays
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert refused.value.status == 404
            assert await ask(watcher, "ping") == "ping"

    run(clients())
    assert [t["id"] for t in tokens(svc, sid) if t["scope"] == "automate"] == [kept["id"]]
    assert svc.uds.session(sid)["cdp_url"] == url  # still what the session announced, now refused


def test_a_bidi_sessions_automate_tokens_are_its_bidi_url(svc: Running, cfg: Config) -> None:
    (cfg.profiles_dir / "firefox.toml").write_text(fakes.CHROMIUM_PROFILE.replace('"cdp"', '"bidi"'))
    created = start(svc, profile="firefox", automation=True)
    assert created["cdp_url"] is None and created["bidi_url"].endswith("/bidi")
    minted = mint(svc, created["id"], "automate")
    assert minted["url"].endswith(f"/automation/{created['id']}/{minted['token']}/bidi")

    async def client() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(minted["url"]) as ws:
            assert await ask(ws, "ping") == "ping"

    run(client())


def test_a_session_without_automation_mints_automate_tokens_without_a_url(svc: Running) -> None:
    created = start(svc)
    assert [t["scope"] for t in tokens(svc, created["id"])] == ["interact"]
    automate = mint(svc, created["id"], "automate")
    assert automate["url"] is None
    with svc.tcp(auth=False) as http:
        answer = http.get(f"/automation/{created['id']}/{automate['token']}/cdp",
                          headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    assert answer.status_code == 404, answer.text

# -- the guest's answers -----------------------------------------------------------------------------
async def _browser_path(body: bytes) -> str:
    """What the relay makes of a /json/version answer with `body`, served on a unix socket as the forward is."""
    async def version(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.add_routes([web.get("/json/version", version)])
    runner = web.AppRunner(app)
    await runner.setup()
    with tempfile.TemporaryDirectory() as d:
        sock = str(Path(d) / "s")
        await web.UnixSite(runner, sock).start()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as session:
                return await automation.ServiceAutomation(ServiceViewers())._browser_path(session)
        finally:
            await runner.cleanup()


def test_the_browsers_version_answer_is_checked_and_read_capped() -> None:
    good = {"webSocketDebuggerUrl": f"ws://127.0.0.1:{guest.DEBUG_PORT}/devtools/browser/ab-12"}
    assert run(_browser_path(json.dumps(good).encode())) == "/devtools/browser/ab-12"
    hostile = [b"x" * (automation.VERSION_CAP + 10), b"[" * 100000, b"not json",
               json.dumps({"webSocketDebuggerUrl": "ws://evil/devtools/page/1"}).encode(),
               json.dumps({"webSocketDebuggerUrl": "ws://h/devtools/browser/../../json"}).encode(),
               json.dumps({"webSocketDebuggerUrl": 7}).encode()]
    for body in hostile:
        with pytest.raises(GuestIOError):
            run(_browser_path(body))


# -- the request -----------------------------------------------------------------------------------
def test_the_request_asks_the_profiles_protocol_and_the_browser_gets_the_loopback_port(cfg: Config) -> None:
    req = from_json(cfg, {"profile": "chromium", "automation": True, "url": "https://example.org/"})
    assert req.automation == "cdp"
    assert req.command == ("fake-browser", f"--remote-debugging-port={guest.DEBUG_PORT}", "https://example.org/")
    assert req.to_json()["automation"] == "cdp"
    plain = from_json(cfg, {"profile": "chromium"})
    assert plain.automation == "" and not any("remote-debugging" in c for c in plain.command)
    # Without an automation template, a boot (a normal template's browser has no debugging port); --warm says so.
    chosen = planning.plan(cfg, req)
    assert chosen.origin is Origin.BOOT and "no automation template of profile 'chromium'" in chosen.why
    with pytest.raises(Conflict, match=r"no automation template.*--automation'"):
        planning.plan(cfg, build(cfg, profile="chromium", automation=True, start="warm"))


# -- templates and the pool ------------------------------------------------------------------------
def test_automation_sessions_restore_from_automation_templates_only_and_get_their_forward(svc: Running,
                                                                                          cfg: Config) -> None:
    rt = svc.dispod.rt
    auto = build(cfg, profile="chromium", automation=True)
    plain = build(cfg, profile="chromium")
    make_template(rt, "chromium")  # a normal template: its browser has no port, so it serves no automation session
    assert planning.plan(cfg, plain).template is not None
    assert "no automation template" in planning.plan(cfg, auto).why
    make_template(rt, "chromium+automation")
    t = TemplateStore(cfg).get("chromium+automation")
    assert (t.key, t.automation) == ("profile-chromium+automation", "cdp")
    assert sorted(x.key for x in TemplateStore(cfg).list()) == ["profile-chromium", "profile-chromium+automation"]
    chosen = planning.plan(cfg, auto)
    assert chosen.origin is Origin.RESTORE and chosen.template is not None
    assert chosen.template.key == "profile-chromium+automation" and "debugging port" in chosen.why, chosen.why
    mine = planning.plan(cfg, plain)  # a normal session never restores from the automation template
    assert mine.template is not None and mine.template.key == "profile-chromium" and "debugging" not in mine.why
    TemplateStore(cfg).remove("chromium")
    assert "no template of profile 'chromium'" in planning.plan(cfg, plain).why
    with pytest.raises(Conflict, match="cannot start warm: no template of profile 'chromium'"):
        planning.plan(cfg, build(cfg, profile="chromium", start="warm"))

    # Restored, its forward to the browser's port is made at restore time: the cdp_url relays to it.
    created = start(svc, automation=True, start="warm")
    status = svc.uds.session(created["id"])
    assert status["start"] == "restore" and status["template"] == "profile-chromium+automation", status
    relays_then_ends(svc, created)


def test_a_pool_of_an_automation_template_serves_automation_sessions_only(svc: Running, cfg: Config) -> None:
    rt = svc.dispod.rt
    assert rt.pool is not None
    with pytest.raises(NotFound, match="no automation template of profile 'chromium'") as e:
        rt.pool.fill("chromium+automation", 1)
    assert e.value.hint == "build one with 'dispo template build chromium --automation'"
    with pytest.raises(InvalidInput, match="automation template is of a profile"):
        rt.pool.fill("minimal+automation", 1)
    make_template(rt, "chromium+automation")
    pool = svc.uds.pool_fill("chromium+automation", 1)
    assert pool["slots"][0]["name"] == "chromium+automation", pool
    deadline = time.monotonic() + SAFETY_S
    while svc.uds.pool()["slots"][0]["ready"] != 1:
        assert time.monotonic() < deadline, svc.uds.pool()
        time.sleep(0.05)
    # The slot names its template once its filler has found it (not yet in fill's own answer, on a busy host).
    assert svc.uds.pool()["slots"][0]["template"] == "profile-chromium+automation", svc.uds.pool()
    plain = planning.plan(cfg, build(cfg, profile="chromium"), rt.pool)  # not for a normal session
    assert plain.origin is Origin.BOOT and plain.guests == ()
    created = start(svc, automation=True)
    status = svc.uds.session(created["id"])
    assert status["start"] == "pool" and status["template"] == "profile-chromium+automation", status
    relays_then_ends(svc, created)
    svc.uds.pool_drain("chromium+automation")


@pytest.mark.parametrize(("body", "error", "words"), [
    ({"image": "minimal", "command": ["true"], "automation": True}, InvalidInput, "goes with a profile"),
    ({"profile": "chromium", "automation": "yes"}, InvalidInput, "automation must be true or false"),
    ({"profile": "chromium", "automation": True, "display": "none"}, InvalidInput, "web display"),
    ({"profile": "noauto", "automation": True}, Conflict, "names no automation protocol"),
])
def test_requests_automation_cannot_serve_are_refused(cfg: Config, body: dict[str, Any],
                                                      error: type[Exception], words: str) -> None:
    (cfg.profiles_dir / "noauto.toml").write_text('image = "minimal"\ncommand = ["app"]\ndisplay = "web"\n')
    with pytest.raises(error, match=words):
        from_json(cfg, body)


def test_dispo_run_automation_asks_dispod_for_it(cfg: Config) -> None:
    body, cli = run_cli._request(run_parser().parse_args(["chromium", "--automation"]))
    assert body == {"profile": "chromium", "automation": True}
    with pytest.raises(InvalidInput, match="served by dispod"):  # in-process there is no relay
        run_cli._run(cfg, body, {**cli, "in_process": True}, run_cli.Printer())
