"""Scoped tokens (issue 22): view, interact and automate links of a session, minted, listed and revoked through
dispod's API, on the fake machinery. The guest's VNC server is this test's own (`Recorder`), published in place
of the fake display's, so what reaches it is observable byte for byte.

Also web/rfb.py's InputFilter alone: what a hostile client sends, a byte at a time or with lengths past the caps.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from dispo.web.rfb import InputFilter, ProtocolViolation
from tests import fakes
from tests.fakeworld import SAFETY_S, Running, mint, serving, tokens, wait_state

pytestmark = pytest.mark.skipif(not Path("/usr/share/novnc/vnc.html").exists(), reason="needs Debian package novnc")

HANDSHAKE = b"RFB 003.008\n" + bytes([1]) + bytes([1])  # version, security None, ClientInit (shared)
SET_PIXEL_FORMAT = struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
SET_ENCODINGS = struct.pack(">BxH", 2, 2) + struct.pack(">ii", 0, -223)
UPDATE = struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48)
MARKER = struct.pack(">BBHHHH", 3, 1, 7, 7, 1, 1)  # the last message sent: once it arrived, all before it did
KEY = struct.pack(">BBxxI", 4, 1, 0x61)
POINTER = struct.pack(">BBHH", 5, 1, 10, 10)
CUT_TEXT = struct.pack(">BxxxI", 6, 5) + b"hello"
QEMU_KEY = struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E)
RESIZE = bytes([251, 0, 0, 10, 0, 10, 1, 0]) + bytes(16)
PIXELS = [SET_PIXEL_FORMAT, SET_ENCODINGS, UPDATE]
INPUT = [KEY, POINTER, CUT_TEXT, QEMU_KEY, RESIZE]


class Recorder:
    """A VNC server on a unix socket: RFB 3.8's handshake (security None, a 64x48 screen), then it keeps every
    byte a client sends, per connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[bytearray] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            got = bytearray()
            self.received.append(got)
            threading.Thread(target=self._serve, args=(conn, got), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, got: bytearray) -> None:
        with conn:
            try:
                conn.sendall(b"RFB 003.008\n")
                while len(got) < 12:
                    got += conn.recv(12 - len(got)) or b"!"
                conn.sendall(bytes([1, 1]))
                pixels = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
                init = struct.pack(">HH", 64, 48) + pixels + struct.pack(">I", 4) + b"fake"
                sent_result = sent_init = False
                while chunk := conn.recv(65536):
                    got += chunk
                    if not sent_result and len(got) >= 13:
                        conn.sendall(struct.pack(">I", 0))
                        sent_result = True
                    if not sent_init and len(got) >= 14:
                        conn.sendall(init)
                        sent_init = True
            except OSError:
                pass

    def wait_for(self, index: int, ending: bytes) -> bytes:
        deadline = time.monotonic() + SAFETY_S
        while len(self.received) <= index or not bytes(self.received[index]).endswith(ending):
            assert time.monotonic() < deadline, self.received
            time.sleep(0.02)
        return bytes(self.received[index])

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Running, str, Recorder]]:
    """dispod on the fakes, one running browser session whose display is this test's Recorder."""
    with serving(fakes.config(tmp_path)) as svc:
        sid = svc.uds.create_session({"profile": "chromium"})["id"]
        wait_state(svc.uds, sid, "running")
        recorder = Recorder(tmp_path / "recorder.sock")
        svc.dispod.viewers.publish(svc.dispod.rt.get(sid), recorder.path)
        try:
            yield svc, sid, recorder
        finally:
            recorder.close()
            svc.uds.delete(sid, wait=True)




def viewer(svc: Running, sid: str, token: str) -> str:
    return f"{svc.base}/viewer/{sid}/{token}/"


async def _vnc(url: str, origin: str, messages: list[bytes]) -> bytes:
    """Through the bridge: the handshake, then `messages`; what the server sent back."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("binary",),
                                                                headers={"Origin": origin}) as ws:
        got = b""
        while len(got) < 12:
            got += (await ws.receive_bytes(timeout=SAFETY_S))
        for message in [HANDSHAKE, *messages]:
            await ws.send_bytes(message)
        while len(got) < 12 + 2 + 4 + 24 + 4:  # security types, result, ServerInit
            got += (await ws.receive_bytes(timeout=SAFETY_S))
        return got


def _ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "websockify"


def test_a_view_token_watches_and_its_input_never_reaches_the_guest(world: tuple[Running, str, Recorder]) -> None:
    svc, sid, recorder = world
    view = mint(svc, sid, "view")
    assert view["scope"] == "view" and view["url"] == viewer(svc, sid, view["token"])
    assert len(view["token"]) >= 32 and view["token"] not in str(tokens(svc, sid))  # listed without the secret
    with svc.tcp(auth=False) as http:
        page = http.get(view["url"])
        assert page.status_code == 200 and 'data-scope="view"' in page.text and "view_only=1" in page.text
        assert http.get(view["url"] + "status").status_code == 200
        assert http.get(view["url"] + "vnc.html").status_code == 200
        # What acts on the guest or moves data is refused, with one line that says why.
        for method, tail in (("GET", "downloads"), ("GET", "downloads/a.bin"), ("POST", "uploads?name=a"),
                             ("GET", "clipboard"), ("PUT", "clipboard"), ("GET", "sound"), ("GET", "features"),
                             ("POST", "stop")):
            r = http.request(method, view["url"] + tail, headers={"Origin": svc.base}, content=b"x")
            assert r.status_code == 403, (tail, r.text)
            assert r.text.count("\n") == 1 and "view link" in r.text, r.text
    # The display stream: greeted, pixels asked for; every input message dropped on the way.
    hello = asyncio.run(_vnc(_ws_url(view["url"]), svc.base, [*PIXELS, *INPUT, MARKER]))
    assert hello.startswith(b"RFB 003.008\n") and hello.endswith(b"fake")
    assert recorder.wait_for(0, MARKER) == HANDSHAKE + b"".join(PIXELS) + MARKER
    assert svc.uds.session(sid)["state"] == "running"


def test_an_interact_token_is_the_viewer_as_today(world: tuple[Running, str, Recorder]) -> None:
    svc, sid, recorder = world
    first = svc.uds.session(sid)["viewer_url"].rstrip("/").rsplit("/", 1)[1]
    listed = tokens(svc, sid)
    assert [t["scope"] for t in listed] == ["interact"]  # the viewer_url's own
    interact = mint(svc, sid, "interact")
    for token in (first, interact["token"]):
        url = viewer(svc, sid, token)
        with svc.tcp(auth=False) as http:
            page = http.get(url)
            assert page.status_code == 200 and 'data-scope="interact"' in page.text
            assert "view_only" not in page.text and "resize=remote" in page.text
            assert http.get(url + "features").status_code == 200
        n = len(recorder.received)
        asyncio.run(_vnc(_ws_url(url), svc.base, [*PIXELS, *INPUT, MARKER]))
        assert recorder.wait_for(n, MARKER) == HANDSHAKE + b"".join(PIXELS + INPUT) + MARKER


def test_an_automate_token_is_refused_by_the_viewer(world: tuple[Running, str, Recorder]) -> None:
    svc, sid, recorder = world
    automate = mint(svc, sid, "automate")
    assert automate["url"] is None and automate["scope"] == "automate"
    url = viewer(svc, sid, automate["token"])
    with svc.tcp(auth=False) as http:
        for tail in ("", "status", "vnc.html", "clipboard", "downloads", "features"):
            r = http.get(url + tail)
            assert r.status_code == 403 and "automate token" in r.text and r.text.count("\n") == 1, (tail, r.text)
        assert http.post(url + "stop", headers={"Origin": svc.base}).status_code == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        asyncio.run(_vnc(_ws_url(url), svc.base, [KEY]))
    assert refused.value.status == 403
    assert recorder.received == []
    assert svc.uds.session(sid)["state"] == "running"


async def _revoked_while_open(svc: Running, sid: str, url: str, grant: dict[str, Any], by: str) -> Any:
    """A WebSocket opened with the token, greeted; then DELETE (by `by`): the socket is closed."""
    async with aiohttp.ClientSession() as http, http.ws_connect(_ws_url(url), protocols=("binary",),
                                                                headers={"Origin": svc.base}) as ws:
        assert (await ws.receive_bytes(timeout=SAFETY_S)).startswith(b"RFB")
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(svc.dispod.paths.socket))) as api:
            r = await api.delete(f"http://dispod/v1/sessions/{sid}/tokens/{grant[by]}")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == grant["id"] and r.json()["connections"] == 1
        msg = await ws.receive(timeout=SAFETY_S)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        return msg.data, msg.extra


@pytest.mark.parametrize("by", ["token", "id"])
def test_a_revoked_token_is_refused_at_once_and_its_websocket_closed(world: tuple[Running, str, Recorder],
                                                                     by: str) -> None:
    svc, sid, _ = world
    grant = mint(svc, sid, "interact")
    kept = mint(svc, sid, "view")
    url = viewer(svc, sid, grant["token"])
    assert {t["id"] for t in tokens(svc, sid)} >= {grant["id"], kept["id"]}
    assert asyncio.run(_revoked_while_open(svc, sid, url, grant, by)) == (4403, "this link was revoked")
    with svc.tcp(auth=False) as http:
        assert http.get(url).status_code == 403
        assert http.get(url + "status").status_code == 403
        assert http.get(kept["url"]).status_code == 200  # the other tokens stay good
    with pytest.raises(aiohttp.WSServerHandshakeError):
        asyncio.run(_vnc(_ws_url(url), svc.base, []))
    assert grant["id"] not in {t["id"] for t in tokens(svc, sid)}
    with svc.raw_uds() as http:
        again = http.delete(f"/v1/sessions/{sid}/tokens/{grant[by]}")
    assert again.status_code == 404 and again.json()["title"] == "NotFound"
    assert grant["token"] not in again.text


def test_a_token_is_good_for_its_own_session_alone(world: tuple[Running, str, Recorder]) -> None:
    svc, a, _ = world
    b = svc.uds.create_session({"profile": "chromium"})["id"]
    try:
        wait_state(svc.uds, b, "running")
        for scope in ("view", "interact"):
            token = mint(svc, a, scope)["token"]
            with svc.tcp(auth=False) as http:
                assert http.get(viewer(svc, a, token)).status_code == 200
                assert http.get(viewer(svc, b, token)).status_code == 403
                assert http.get(viewer(svc, b, token) + "status").status_code == 403
            with pytest.raises(aiohttp.WSServerHandshakeError):
                asyncio.run(_vnc(_ws_url(viewer(svc, b, token)), svc.base, []))
            with svc.raw_uds() as http:  # nor revoked through another session
                assert http.delete(f"/v1/sessions/{b}/tokens/{token}").status_code == 404
    finally:
        svc.uds.delete(b, wait=True)


def test_token_requests_that_are_wrong_say_why(world: tuple[Running, str, Recorder]) -> None:
    svc, sid, _ = world
    command = svc.uds.create_session({"image": "minimal", "command": ["sleep", "600"]})["id"]
    with svc.raw_uds() as http:
        for body in ({"scope": "admin"}, {}, {"scope": "view", "more": 1}, ["view"]):
            r = http.post(f"/v1/sessions/{sid}/tokens", json=body)
            assert r.status_code == 400 and "scope" in r.json()["detail"], r.text
        assert http.post("/v1/sessions/0badcafe/tokens", json={"scope": "view"}).status_code == 404
        assert http.post("/v1/sessions/nope/tokens", json={"scope": "view"}).status_code == 400
        no_viewer = http.post(f"/v1/sessions/{command}/tokens", json={"scope": "view"})
        assert no_viewer.status_code == 409 and no_viewer.json()["title"] == "Conflict"
        assert http.delete(f"/v1/sessions/{sid}/tokens/not%20one").status_code == 400
    with svc.tcp() as http:  # on TCP, the API's bearer token is needed as for every /v1 call
        assert http.post(f"/v1/sessions/{sid}/tokens", json={"scope": "view"}).status_code == 201
    with svc.tcp(auth=False) as http:
        assert http.post(f"/v1/sessions/{sid}/tokens", json={"scope": "view"}).status_code == 401
        assert http.get(f"/v1/sessions/{sid}/tokens").status_code == 401
    svc.uds.delete(command, wait=True)


# -- the filter alone ----------------------------------------------------------------------------------
def test_the_filter_passes_pixels_and_drops_input_however_the_bytes_are_cut() -> None:
    stream = HANDSHAKE + b"".join(m for pair in zip(PIXELS + [MARKER] * 2, INPUT, strict=True) for m in pair)
    wanted = HANDSHAKE + b"".join(PIXELS) + MARKER * 2
    assert InputFilter().feed(stream) == wanted
    one_by_one = InputFilter()
    assert b"".join(one_by_one.feed(stream[i:i + 1]) for i in range(len(stream))) == wanted
    assert one_by_one.dropped == len(INPUT)


@pytest.mark.parametrize("data", [
    b"RFB 003.003\n",                                     # 3.3: the server would pick the security type
    b"GET / HTTP/1.1\r\n",                                # not RFB at all
    HANDSHAKE[:12] + bytes([19]),                         # VeNCrypt: not parsed, so not passed
    HANDSHAKE + bytes([7]),                               # an unknown message type
    HANDSHAKE + struct.pack(">BxH", 2, 60000),            # SetEncodings past its cap
    HANDSHAKE + struct.pack(">BxxxI", 6, 1 << 30),        # ClientCutText past its cap
    HANDSHAKE + struct.pack(">Bxxxi", 6, -(1 << 31)),     # ... in the extended clipboard's (negative) form
    HANDSHAKE + bytes([248, 0, 0, 0, 0, 0, 0, 0, 200]),   # a fence past RFB's own cap
    HANDSHAKE + bytes([255, 9]),                          # an unknown QEMU message
])
def test_the_filter_refuses_what_a_viewer_does_not_send(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        InputFilter().feed(data)


def test_a_dropped_message_is_skipped_not_held() -> None:
    f = InputFilter()
    f.feed(HANDSHAKE + struct.pack(">BxxxI", 6, 1 << 20))
    for _ in range(16):  # its megabyte of text arrives: nothing passes, and nothing is kept
        assert f.feed(b"x" * (1 << 16)) == b""
        assert len(f._pending) == 0
    assert f.feed(UPDATE) == UPDATE

