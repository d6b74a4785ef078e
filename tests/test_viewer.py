"""The web viewer against a real VNC server (TigerVNC's Xvnc) and a real browser (Playwright + chromium)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispo.web.viewer import Target, WebViewer

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvnc") and shutil.which("xsetroot") and Path("/usr/share/novnc/vnc.html").exists()),
    reason="needs Debian packages tigervnc-standalone-server, x11-xserver-utils and novnc",
)

MAGENTA = (255, 0, 255)


def _free_display() -> int:
    for n in range(50, 99):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def vnc_server() -> Iterator[Target]:
    """A real VNC server on loopback whose screen is solid magenta."""
    display, port = _free_display(), _free_port()
    xvnc = subprocess.Popen(["Xvnc", f":{display}", "-rfbport", str(port), "-localhost", "-SecurityTypes", "None",
                             "-geometry", "640x480", "-depth", "24"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        subprocess.run(["xsetroot", "-display", f":{display}", "-solid", "#ff00ff"], check=True, timeout=10)
        yield Target("127.0.0.1", port)
    finally:
        xvnc.terminate()
        xvnc.wait(10)


def test_unix_socket_target(vnc_server: Target, tmp_path: Path) -> None:
    """The viewer reaches VNC through a unix socket (as through an SSH forward): a real RFB greeting."""
    import asyncio

    sock = tmp_path / "vnc.sock"

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(vnc_server.host, vnc_server.port)

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            while data := await a.read(65536):
                b.write(data)
                await b.drain()
            b.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_unix_server(relay, path=str(sock)))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        from aiohttp import ClientSession, WSMsgType

        async def greet(url: str) -> bytes:
            async with ClientSession() as http, http.ws_connect(url, protocols=("binary",)) as ws:
                msg = await ws.receive(timeout=10)
                assert msg.type is WSMsgType.BINARY
                return bytes(msg.data)

        with WebViewer(Target(unix=str(sock))) as v:
            hello = asyncio.run(greet(f"ws://127.0.0.1:{v.port}/{v.token}/websockify"))
        assert hello.startswith(b"RFB 003.")
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _get(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_token_is_required(vnc_server: Target) -> None:
    stopped = threading.Event()
    with WebViewer(vnc_server, session_id="0123abcd", on_stop=stopped.set) as v:
        base = f"http://127.0.0.1:{v.port}"
        assert v.url.startswith(base) and len(v.token) >= 32
        assert _get(v.url) == 200
        assert _get(v.url + "vnc.html") == 200
        assert _get(base + "/") == 403
        assert _get(base + "/vnc.html") == 403
        assert _get(base + "/wrong-token/vnc.html") == 403
        assert _get(base + "/" + v.token[:-1] + "/vnc.html") == 403
        assert _get(v.url + "..%2f..%2f..%2fetc%2fpasswd") in (403, 404)
        assert _get(v.url + "../../../etc/passwd") in (403, 404)
        assert v.refused >= 4
        assert not stopped.is_set()
        assert _get(v.url + "stop", "POST") == 200
        assert stopped.wait(5)
    with socket.socket() as s:  # nothing listens after stop
        assert s.connect_ex(("127.0.0.1", v.port)) != 0


def _launch(p: Any) -> Any:
    """Debian's chromium under Playwright, quiet (no background requests, no first-run UI)."""
    return p.chromium.launch(executable_path=shutil.which("chromium"), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])


def test_browser_sees_the_guest_screen(vnc_server: Target, tmp_path: Path) -> None:
    if not shutil.which("chromium"):
        pytest.skip("needs Debian package chromium")
    from playwright.sync_api import sync_playwright

    with WebViewer(vnc_server, session_id="0123abcd") as v, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(v.url)
            frame = page.frame_locator("#vnc")
            canvas = frame.locator("canvas")
            canvas.wait_for(state="visible", timeout=20000)
            shot = tmp_path / "viewer.png"
            deadline = time.monotonic() + 20
            rgb: tuple[int, ...] = ()
            while time.monotonic() < deadline:
                page.screenshot(path=str(shot))
                rgb = _pixel(shot, 400, 300)
                if rgb == MAGENTA:
                    break
                time.sleep(0.5)
            assert rgb == MAGENTA, f"centre pixel {rgb}, expected the guest's magenta screen"
            assert page.locator("#end").is_visible()
        finally:
            browser.close()
    artifacts = Path(__file__).resolve().parent.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "viewer-loopback.png")


def _pixel(png: Path, x: int, y: int) -> tuple[int, ...]:
    fmt = ",".join(f"%[fx:int(255*p{{{x},{y}}}.{c})]" for c in "rgb")
    out = subprocess.run(["convert", str(png), "-format", fmt, "info:"], capture_output=True, text=True, check=True)
    return tuple(int(c) for c in out.stdout.strip().split(","))


def test_the_standalone_viewer_has_the_service_guards(tmp_path: Path) -> None:
    """`dispo run`'s own viewer: a slow request head is cut off, connections are capped, a foreign Origin
    cannot open the VNC WebSocket nor end the session, a foreign Host is refused (DNS rebinding)."""
    import http.client

    from dispo.web.guard import Limits

    ended: list[bool] = []
    viewer = WebViewer(Target(unix=str(tmp_path / "no-vnc.sock")), session_id="0badc0de",
                       on_stop=lambda: ended.append(True), limits=Limits(max_connections=4, header_timeout_s=1.0))
    with viewer:
        port = viewer.port
        # Half a request head, then nothing: the viewer answers 408 and closes (observable, not timed).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")
            answer = slow.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and slow.recv(4096) == b""
        # More connections than the cap, each of which showed the token: the extra one is answered 503 at once.
        held: list[socket.socket] = []
        try:
            for _ in range(4):
                held.append(s := socket.create_connection(("127.0.0.1", port), timeout=10))
                s.sendall(f"GET /{viewer.token}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                assert s.recv(65536).startswith(b"HTTP/1.1 200")  # the page is small: one read has its head
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        finally:
            for s in held:
                s.close()

        def request(method: str, path: str, headers: dict[str, str]) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(method, path, headers=headers)
                return conn.getresponse().status
            finally:
                conn.close()

        base = f"/{viewer.token}/"
        assert request("GET", base, {}) == 200
        assert request("GET", base, {"Host": "attacker.example:80"}) == 403
        evil = {"Origin": "http://attacker.example"}
        assert request("POST", base + "stop", evil) == 403 and ended == []
        ws = {**evil, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        assert request("GET", base + "websockify", ws) == 403
        assert request("POST", base + "stop", {"Origin": f"http://127.0.0.1:{port}"}) == 200 and ended == [True]


class _StubIO:
    """Stands in for a session's GuestIO (runtime/guestio.py): what the viewer's bar asks for, no guest."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from dispo.features import Features

        self.live = SimpleNamespace(request=SimpleNamespace(features=Features(audio=True)), touch=lambda: None)
        self.uploaded: dict[str, bytes] = {}

    def downloads(self) -> list[object]:
        from dispo.runtime.guestio import Download

        return [Download("report <b>x</b>.pdf", 5, True), Download("big.iso", 9, False)]

    def body_limits(self) -> tuple[float, int]:
        return 30.0, 1 << 16

    def begin_upload(self, name: str, size: int) -> object:
        from types import SimpleNamespace

        parts: list[bytes] = []

        def finish() -> str:
            self.uploaded[name] = b"".join(parts)
            return name

        return SimpleNamespace(write=parts.append, finish=finish, abort=lambda: None)


def test_the_viewers_bar_lists_downloads_and_uploads_a_file(vnc_server: Target) -> None:
    """viewer.js in a real browser: the Downloads panel shows the guest's names as text (never markup) with a
    link for complete files only, the file chooser uploads, and the Sound button shows for a profile with sound."""
    if not shutil.which("chromium"):
        pytest.skip("needs Debian package chromium")
    from playwright.sync_api import expect, sync_playwright

    io = _StubIO()
    with WebViewer(vnc_server, session_id="0123abcd", io=io) as v, sync_playwright() as p:  # type: ignore[arg-type]
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(v.url)
            page.locator("#downloads").click()
            items = page.locator("#files li")
            items.nth(1).wait_for(timeout=20000)
            assert items.count() == 2
            assert items.nth(0).inner_text().startswith("report <b>x</b>.pdf")
            assert page.locator("#files b").count() == 0  # the guest's name stayed text
            link = items.nth(0).locator("a")
            assert link.get_attribute("href") == "downloads/report%20%3Cb%3Ex%3C%2Fb%3E.pdf"
            assert items.nth(1).locator("a").count() == 0 and "downloading" in items.nth(1).inner_text()
            from playwright.sync_api import FilePayload

            note = FilePayload(name="notes.txt", mimeType="text/plain", buffer=b"hello guest")
            page.locator("#upload").set_input_files(files=[note])
            # Not page.wait_for_function("..."): a string predicate is eval()ed in the page, which the viewer's CSP
            # (script-src 'self') refuses, so it failed whenever the upload was not done at its first check.
            expect(page.locator("#status")).to_contain_text("Uploaded", timeout=20000)
            assert io.uploaded == {"notes.txt": b"hello guest"}
            assert page.locator("#sound").is_visible()
        finally:
            browser.close()


# -- the page while the session comes up, and when it fails (the fake machinery: no guest) -------------------
# Every text the page's progress line showed, in order, recorded in the page as it changes.
_RECORD_PROGRESS = """
window.__progress = [];
new MutationObserver(function () {
  var box = document.getElementById("progress"), line = document.getElementById("progress-text");
  if (!box || box.hidden || !line) { return; }
  var seen = window.__progress, text = line.textContent;
  if (text && seen[seen.length - 1] !== text) { seen.push(text); }
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


@pytest.fixture
def fake_runtime(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A Runtime on the fakes (tests/fakes.py) with `dispo run`'s own viewers; the guest is ready after
    `ready_delay` seconds (the test's parameter)."""
    from dispo.runtime import Runtime
    from dispo.web.viewers import StandaloneViewers
    from tests import fakes

    viewers = StandaloneViewers()
    rt = Runtime(fakes.config(tmp_path), machinery=fakes.machinery(ready_delay=request.param), viewers=viewers)
    try:
        yield rt
    finally:
        assert rt.shutdown("test over", timeout=30) == []
        viewers.close(grace_s=0)


@pytest.mark.parametrize("fake_runtime", [5.0], indirect=True)
def test_the_page_says_what_happens_until_the_display_is_up(fake_runtime: Any) -> None:
    """Opened while the session starts (as `dispo run` prints the URL at once), the page says in words what
    happens (at least two different steps), then shows the guest's display."""
    if not shutil.which("chromium"):
        pytest.skip("needs Debian package chromium")
    import re

    from playwright.sync_api import expect, sync_playwright

    from dispo.runtime import build

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.add_init_script(_RECORD_PROGRESS)
            live = fake_runtime.start(build(fake_runtime.cfg, profile="chromium", url="http://example.test/"))
            assert live.viewer_url is not None, "the viewer is only served once the display is up"
            page.goto(live.viewer_url)
            line = page.locator("#progress-text")
            assert line.get_attribute("role") == "status" and line.get_attribute("aria-live") == "polite"
            # As the dashboard's row: which step of how many, warm or cold, and the time so far.
            detail = re.compile(r"Step \d+ of 8, cold start, \d+ s so far")
            expect(page.locator("#progress-detail")).to_contain_text(detail)
            page.frame_locator("#vnc").locator("html.noVNC_connected").wait_for(state="attached", timeout=20000)
            page.locator("#progress").wait_for(state="hidden", timeout=20000)
            seen = page.evaluate("window.__progress")
            assert "Waiting for the guest to boot…" in seen and "Connecting to the display…" in seen, seen
            assert seen.index("Waiting for the guest to boot…") < seen.index("Connecting to the display…"), seen
            assert page.locator("#vnc").is_visible()
            live.stop("test over")
            # The session ended: the page says so, and the display (noVNC's reconnecting) is gone.
            page.locator("#progress-text").filter(has_text="The session ended: test over.").wait_for(timeout=20000)
            assert page.locator("#vnc").count() == 0
        finally:
            browser.close()


@pytest.mark.parametrize("fake_runtime", [60.0], indirect=True)
def test_the_page_shows_why_the_start_failed(fake_runtime: Any) -> None:
    """The guest dies while the page waits for it: the page says the session failed, with the error's line and
    hint as text, and stops asking."""
    if not shutil.which("chromium"):
        pytest.skip("needs Debian package chromium")
    import os
    import signal

    from playwright.sync_api import sync_playwright

    from dispo.runtime import build
    from tests import fakes

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            live = fake_runtime.start(build(fake_runtime.cfg, profile="chromium", url="http://example.test/"))
            assert live.viewer_url is not None, "the viewer is only served once the display is up"
            page.goto(live.viewer_url)
            page.locator("#progress-text").filter(has_text="Waiting for the guest to boot…").wait_for(timeout=20000)
            (pid,) = fakes.fake_vmm_pids(live.id, fake_runtime.cfg.state_dir)
            os.kill(pid, signal.SIGKILL)  # the fake VMM this test's session started
            assert live.wait(30) and live.error is not None
            problem = page.locator("#problem")
            problem.filter(has_text="the guest stopped before it was ready").wait_for(timeout=20000)
            assert page.locator("#progress-text").inner_text() == "The session failed."
            assert page.locator("#problem-hint").inner_text() == "Hint: a fake VMM: see the test"
            assert problem.get_attribute("role") == "alert"
            assert "GuestFailure" not in problem.inner_text()  # words, not a Python repr
            assert page.locator("#vnc").count() == 0 and page.locator("#end").is_disabled()
            polls: list[str] = []
            page.on("request", lambda r: polls.append(r.url))
            page.wait_for_timeout(2500)  # more than two polling periods: the page asked nothing more
            assert polls == []
        finally:
            browser.close()
