"""The dashboard as people use it, in a real browser (Playwright + Debian's chromium) against dispod on fake
machinery: progress while a session starts, the ended ones listed with their receipt, a start that fails after
its 201, where the focus goes, and a connection that recovers when dispod comes back."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from dispo.config import Config
from dispo.errors import GuestFailure
from dispo.infra.txn import Transaction
from dispo.runtime.machinery import Identity
from tests import axe, fakes
from tests.fakeworld import SAFETY_S, Running, cfg, dispod_ready, end_dispod, make_template, serving, spawn_dispod

__all__ = ["cfg"]

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium")

TIMEOUT_MS = 30_000
CONSOLE = "fake guest: booting\nkernel: something went wrong\nfake guest: gave up"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    p = browser.new_page(viewport={"width": 1280, "height": 900})
    p.set_default_timeout(TIMEOUT_MS)
    yield p
    p.close()


@contextlib.contextmanager
def served(cfg: Config, **kw: Any) -> Iterator[Running]:
    """tests/fakeworld.py's dispod, opened and closed on a thread of its own: Playwright's sync API keeps an
    event loop running on this one, where dispod's reclaim (pyroute2) cannot run its own."""
    cm = serving(cfg, **kw)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(cm.__enter__).result()
        try:
            yield running
        finally:
            pool.submit(cm.__exit__, None, None, None).result()


def _record_progress(page: Page) -> None:
    """Keep every text the Progress cells show (the page updates them in place)."""
    page.evaluate("""() => { window.seen = new Set();
        new MutationObserver(() => document.querySelectorAll('#rows .state').forEach(
            td => window.seen.add(td.textContent))).observe(document.body,
            {subtree: true, childList: true, characterData: true}); }""")


def test_a_start_shows_its_steps_then_ends_into_the_history_with_a_clean_receipt(cfg: Config, page: Page) -> None:
    # The guest boots for 4 s: time enough for the page to show that step even on a loaded machine.
    with served(cfg, machinery=fakes.machinery(ready_delay=4.0)) as svc:
        page.goto(svc.dispod.dashboard_url)
        _record_progress(page)
        page.get_by_role("button", name="Start chromium").click()
        expect(page.locator("#rows .state").first).to_have_text("Running", timeout=TIMEOUT_MS)
        seen = page.evaluate("() => Array.from(window.seen)")
        starting = [t for t in seen if "cold start" in t]
        assert any("Waiting for the guest to boot" in t for t in starting), seen
        assert all("step " in t for t in starting), seen
        expect(page.locator("#rows .age").first).not_to_have_text("")
        end = page.get_by_role("button", name="End session")
        end.focus()
        end.press("Enter")
        row = page.locator("#history-rows tr").first
        expect(row).to_contain_text("Ended by you.")
        # The only session's row went: the focus is on the Sessions heading, not at the top of the page.
        expect(page.locator("#sessions-h")).to_be_focused()
        expect(page.get_by_text("No sessions.")).to_be_visible()
        link = row.get_by_role("link", name="Receipt (clean)")
        href = link.get_attribute("href") or ""
        page.goto(page.url + href)
        expect(page.locator("#verdict")).to_have_text("Clean: nothing of the session is left.")
        expect(page.get_by_text("The image: unchanged")).to_be_visible()


def test_ending_a_session_puts_the_focus_on_the_next_rows_button(cfg: Config, page: Page) -> None:
    with served(cfg) as svc:
        ids = [svc.uds.create_session(dict(fakes_profile()))["id"] for _ in range(2)]
        page.goto(svc.dispod.dashboard_url)
        buttons = page.get_by_role("button", name="End session")
        expect(buttons).to_have_count(2)
        expect(page.locator("#rows .state")).to_have_text(["Running", "Running"])
        first = page.locator(f"#session-{ids[0]} button.end")
        first.focus()
        first.press("Enter")
        expect(page.locator(f"#session-{ids[0]}")).to_have_count(0)
        expect(page.locator(f"#session-{ids[1]} button.end")).to_be_focused()


def test_the_history_says_how_each_session_ended_from_its_end_kind(cfg: Config, page: Page) -> None:
    with served(cfg) as svc:
        page.goto(svc.dispod.dashboard_url)
        idle = svc.uds.create_session({"image": "minimal", "command": ["sleep", "600"], "idle_timeout_s": 1})["id"]
        exited = svc.uds.create_session({"image": "minimal", "command": ["sh", "-c", "exit 7"]})["id"]
        other = svc.uds.create_session({"image": "minimal", "command": ["sleep", "600"]})["id"]
        expect(page.locator(f"#session-{other} .state")).to_have_text("Running")
        svc.uds.delete(other)
        expect(page.locator(f"#ended-{idle} .how")).to_have_text("Ended after 1 s idle.")
        expect(page.locator(f"#ended-{exited} .how")).to_have_text("The app quit with an error (status 7).")
        expect(page.locator(f"#ended-{other} .how")).to_have_text(
            "Ended through the API (dispo stop, or another page).")


def test_a_running_session_shows_a_thumbnail_of_its_screen(cfg: Config, page: Page) -> None:
    with served(cfg) as svc:
        sid = svc.uds.create_session(fakes_profile())["id"]
        page.goto(svc.dispod.dashboard_url)
        thumb = page.locator(f"#session-{sid} img.thumb")
        expect(thumb).to_have_js_property("naturalWidth", 240)  # loaded: the thumbnail's width
        expect(thumb).to_be_visible()
        # The picture's centre, read back in the page (same origin): the fake display's colour.
        rgb = page.evaluate("""img => { const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');
            g.drawImage(img, 0, 0); return [img.naturalWidth,
              Array.from(g.getImageData(c.width / 2, c.height / 2, 1, 1).data.slice(0, 3))]; }""",
                            thumb.element_handle())
        assert rgb == [240, list(fakes.SCREEN_RGB)], rgb
        # Refreshed: the page asks for the picture again by itself.
        with page.expect_response(lambda r: f"/thumb/{sid}" in r.url and r.status == 200):
            pass
        # The link around it is still named by its words.
        expect(page.locator(f"#session-{sid}").get_by_role("link", name="Open viewer")).to_be_visible()


def test_the_thumbnail_route_answers_a_png_for_the_dashboards_token_alone(cfg: Config) -> None:
    with served(cfg) as svc, svc.tcp(auth=False) as http:
        sid = svc.uds.create_session(fakes_profile())["id"]
        plain = svc.uds.create_session({"image": "minimal", "command": ["sleep", "600"]})["id"]
        deadline = time.monotonic() + SAFETY_S
        while (r := http.get(f"/ui/{svc.token}/thumb/{sid}")).status_code != 200:
            assert r.status_code == 404 and time.monotonic() < deadline, r.text  # until its display is up
            time.sleep(0.1)
        assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
        assert r.headers["cache-control"] == "no-store"
        assert http.get(f"/ui/{svc.token[:-2]}xx/thumb/{sid}").status_code == 403
        assert http.get(f"/ui/{svc.token}/thumb/{plain}").status_code == 404  # no display
        assert http.get(f"/ui/{svc.token}/thumb/..%2f..").status_code in (400, 404)
        svc.uds.delete(sid, wait=True)
        assert http.get(f"/ui/{svc.token}/thumb/{sid}").status_code == 404  # ended


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_accessibility_violation_on_the_dashboard_and_the_viewer(cfg: Config, page: Page,
                                                                                    scheme: str) -> None:
    page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
    failing = dataclasses.replace(fakes.machinery(), identity=_failing_identity)
    with served(cfg, machinery=failing) as svc:
        page.goto(svc.dispod.dashboard_url)
        expect(page.get_by_text("No sessions.")).to_be_visible()
        assert axe.violations(page) == [], "the dashboard, idle"
        page.get_by_role("button", name="Start chromium").click()  # fails after its 201: the history's error
        page.locator("#history-rows tr").first.get_by_text("The guest console's last lines").click()
        found = axe.violations(page)
        assert found == [], ("the dashboard, with a failed start", str(found))
    with served(cfg) as svc:
        running = svc.uds.create_session(fakes_profile())
        exited = svc.uds.create_session({"image": "minimal", "command": ["sh", "-c", "exit 3"]})["id"]
        page.goto(svc.dispod.dashboard_url)
        expect(page.locator(f"#session-{running['id']} img.thumb")).to_have_js_property("naturalWidth", 240)
        expect(page.locator(f"#ended-{exited}")).to_be_visible()
        assert axe.violations(page) == [], "the dashboard, with a running session (thumbnail) and history"
        page.goto(f"{svc.dispod.dashboard_url}receipt/{exited}")
        expect(page.locator("#verdict")).to_be_visible()
        assert axe.violations(page) == [], "a receipt page"
        page.goto(running["viewer_url"])
        page.frame_locator("#vnc").locator("html.noVNC_connected").wait_for(state="attached")
        expect(page.locator("#progress")).to_be_hidden()
        assert axe.violations(page, exclude=("#vnc",)) == [], "the viewer (noVNC's own page is not ours)"
        svc.uds.delete(running["id"], wait=True)
        expect(page.locator("#progress-text")).to_contain_text("The session ended")
        assert axe.violations(page) == [], "the viewer, once its session ended"


def fakes_profile() -> dict[str, Any]:
    return {"profile": "chromium"}


def _failing_identity(tx: Transaction, disk: Path) -> Identity:
    raise GuestFailure("the guest did not come up", hint="look at the console's last lines", console_tail=CONSOLE)


def test_a_start_that_fails_after_its_201_stays_listed_with_its_error_hint_and_console(cfg: Config,
                                                                                       page: Page) -> None:
    failing = dataclasses.replace(fakes.machinery(), identity=_failing_identity)
    with served(cfg, machinery=failing) as svc:
        page.goto(svc.dispod.dashboard_url)
        page.get_by_role("button", name="Start chromium").click()
        row = page.locator("#history-rows tr").first
        expect(row).to_contain_text("Could not start: The guest did not come up: look at the console's last lines.")
        row.get_by_text("The guest console's last lines").click()
        expect(row.locator("pre")).to_contain_text("kernel: something went wrong")
        expect(page.locator("#status")).not_to_contain_text("Starting chromium")
        expect(page.get_by_text("No sessions.")).to_be_visible()


def test_an_error_puts_the_focus_on_the_alert_in_words(cfg: Config, page: Page) -> None:
    with served(cfg, max_sessions=1) as svc:
        svc.uds.create_session(fakes_profile())
        page.goto(svc.dispod.dashboard_url)
        start = page.get_by_role("button", name="Start chromium")
        start.focus()
        start.press("Enter")
        alert = page.get_by_role("alert").filter(has_text="Could not start chromium")
        expect(alert).to_be_visible()
        expect(page.locator("#alert")).to_be_focused()
        expect(page.locator("#status")).not_to_contain_text("Starting chromium")


def _restart(cfg: Config, root: Path, log: Path, address: str, *extra: str) -> Any:
    url_file = cfg.state_dir / "dispod.url"
    url_file.unlink(missing_ok=True)
    proc = spawn_dispod(root, log, "--listen", address, *extra)
    dispod_ready(cfg, proc, log)
    deadline = time.monotonic() + SAFETY_S
    while not url_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_the_page_says_when_dispod_is_gone_and_comes_back_by_itself_after_its_restart(cfg: Config, page: Page,
                                                                                     tmp_path: Path) -> None:
    root = tmp_path
    log = root / "dispod.log"
    url_file = cfg.state_dir / "dispod.url"
    proc = spawn_dispod(root, log, "--listen", "127.0.0.1:0")
    try:
        dispod_ready(cfg, proc, log)
        first = url_file.read_text().strip()
        address = first.split("/")[2]
        page.goto(first)
        expect(page.get_by_text("No sessions.")).to_be_visible()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(SAFETY_S)
        # Within 5 s of dispod's death (the timeout is the acceptance's bound, not a measurement).
        expect(page.locator("#connection")).to_contain_text("Lost the connection to dispod", timeout=5000)
        proc = _restart(cfg, root, log, address)
        # dispod kept its token (dispod.token): the same link works, and the open page came back by itself.
        assert url_file.read_text().strip() == first
        expect(page.locator("#connection")).to_be_hidden()
        page.get_by_role("button", name="Start chromium").click()
        expect(page.locator("#rows .state").first).to_have_text("Running")
        # A new token (dispod --new-token): the old link is no longer valid; the page says what to do, in words.
        proc.send_signal(signal.SIGTERM)
        proc.wait(SAFETY_S)
        proc = _restart(cfg, root, log, address, "--new-token")
        expect(page.locator("#connection")).to_contain_text("Open the dashboard again from the link in dispod.url")
        second = url_file.read_text().strip()
        assert second != first
        page.goto(second)
        page.get_by_role("button", name="Start chromium").click()
        expect(page.locator("#rows .state").first).to_have_text("Running")
        expect(page.locator("#connection")).to_be_hidden()
    finally:
        end_dispod(proc)


def test_profile_cards_say_what_a_session_gets_and_whether_it_starts_warm(cfg: Config) -> None:
    with served(cfg) as svc, svc.tcp(auth=False) as http:
        card = http.get(f"/ui/{svc.token}/").text
        assert "256 MiB memory, 1 vCPU" in card, card
        assert "Cold start (boots): no template yet" in card and "<code>dispo template build chromium</code>" in card
        assert "Sound off; downloads on; uploads on; clipboard to the guest and from the guest" in card, card
        make_template(svc.dispod.rt, "chromium")
        card = http.get(f"/ui/{svc.token}/").text
        assert "<strong>Warm start</strong>: restored from its template" in card, card
