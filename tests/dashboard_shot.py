"""Drive dispod's dashboard in a real browser (Playwright + Debian's chromium), as a person would: start a
profile on a URL, see its steps go by, open its viewer, wait for the page's colour (in the viewer and in the
row's thumbnail), end the session, see the list empty and the ended row, and follow its receipt link. Run in
the netns where dispod listens: `python -m tests.dashboard_shot DASHBOARD_URL PAGE_URL OUT_DIR RRGGBB TIMEOUT`.
Prints JSON on its last line.

`python -m tests.dashboard_shot --docs [DIR]` makes the dashboard's pictures in docs/ (idle, starting, running
with thumbnails, history) from the fake world (tests/fakes.py: no guest, no root; the fake display draws a
known colour): a dispod of its own in a scratch dir.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from tests.viewer_shot import watch_colour

# The centre pixel of a loaded <img>, read back in the page (same origin): [r, g, b], or null before it loaded.
CENTRE = """img => { if (!img.naturalWidth) { return null; }
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    return Array.from(g.getImageData(c.width / 2, c.height / 2, 1, 1).data.slice(0, 3)); }"""


def thumb_colour(ui: Page, want: tuple[int, ...], limit: float) -> dict[str, object]:
    """Wait (up to `limit` s) until the first row's thumbnail shows `want` at its centre (it is refreshed every
    few seconds, so a picture taken before the page drew comes again)."""
    thumb = ui.locator("#rows img.thumb").first
    deadline = time.monotonic() + limit
    rgb = None
    while time.monotonic() < deadline:
        rgb = ui.evaluate(CENTRE, thumb.element_handle()) if thumb.count() else None
        if rgb is not None and all(abs(a - b) <= 4 for a, b in zip(rgb, want, strict=True)):
            return {"thumb_seen": True, "thumb_rgb": rgb}
        ui.wait_for_timeout(500)
    return {"thumb_seen": False, "thumb_rgb": rgb}


DOCS = Path(__file__).resolve().parent.parent / "docs" / "img"


def docs(out: Path) -> int:
    """The docs' pictures, from a dispod on the fake machinery whose guests take 20 s to be ready."""
    import tempfile

    from tests import fakes
    from tests.fakeworld import dispod_ready, end_dispod, spawn_dispod

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dispo-docs-") as tmp:
        root = Path(tmp)
        cfg = fakes.config(root)
        log = root / "dispod.log"
        proc = spawn_dispod(root, log, "--listen", "127.0.0.1:0", "--machinery", "tests.dashboard_shot:docs_machinery")
        try:
            client = dispod_ready(cfg, proc, log)
            url_file = cfg.state_dir / "dispod.url"
            deadline = time.monotonic() + 60
            while not url_file.exists():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            dashboard = url_file.read_text().strip()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run"])
                try:
                    ui = browser.new_page(viewport={"width": 1100, "height": 800})
                    ui.set_default_timeout(120_000)
                    ui.goto(dashboard)
                    ui.get_by_text("No sessions.").wait_for()
                    ui.screenshot(path=str(out / "dashboard-idle.png"), full_page=True)
                    start = ui.get_by_role("button", name="Start chromium")
                    ui.get_by_label("URL", exact=False).first.fill("https://example.org/")
                    start.click()
                    ui.locator("#rows .state").filter(has_text="Waiting for the guest to boot").wait_for()
                    ui.screenshot(path=str(out / "dashboard-starting.png"), full_page=True)
                    start.click()
                    ui.locator("#rows .state").nth(1).wait_for()
                    ui.locator("#rows .state").filter(has_text="Running").nth(1).wait_for()
                    start.click()  # a third, starting, beside the two running ones
                    ui.locator("#rows .state").filter(has_text="Waiting for the guest to boot").wait_for()
                    for i in range(2):
                        ui.locator("#rows img.thumb").nth(i).wait_for(state="visible")
                    ui.screenshot(path=str(out / "dashboard-running.png"), full_page=True)
                    ids = [tr.get_attribute("id") or "" for tr in ui.locator("#rows tr").all()]
                    client.delete(ids[-1].removeprefix("session-"))  # through the API: "Ended through the API"
                    for _ in range(2):
                        ui.get_by_role("button", name="End session").first.click()
                    ui.get_by_text("No sessions.").wait_for()
                    ui.locator("#history-rows tr").nth(2).get_by_role("link", name="Receipt (clean)").wait_for()
                    ui.screenshot(path=str(out / "dashboard-history.png"), full_page=True)
                finally:
                    browser.close()
            client.close()
        finally:
            end_dispod(proc)
    print(json.dumps({"pictures": sorted(str(p) for p in out.glob("dashboard-*.png"))}))
    return 0


def docs_machinery() -> object:
    """The fakes, with guests that take 20 s to be ready (so the pictures can show a start under way)."""
    from tests import fakes

    return fakes.machinery(ready_delay=20.0)


def main() -> int:
    if sys.argv[1:2] == ["--docs"]:
        return docs(Path(sys.argv[2]) if len(sys.argv) > 2 else DOCS)
    dashboard, page_url, out_dir, hex_rgb, timeout = sys.argv[1:6]
    out, limit = Path(out_dir), float(timeout)
    want = tuple(int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4))
    result: dict[str, object] = {"seen": False}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            ui = browser.new_page(viewport={"width": 1280, "height": 900})
            ui.goto(dashboard)
            # Every text the row's Progress cell shows while the session starts (updated in place).
            ui.evaluate("""() => { window.seen = new Set();
                new MutationObserver(() => document.querySelectorAll('#rows .state').forEach(
                    td => window.seen.add(td.textContent))).observe(document.body,
                    {subtree: true, childList: true, characterData: true}); }""")
            ui.get_by_label("URL", exact=False).first.fill(page_url)
            ui.get_by_role("button", name="Start chromium").click()
            link = ui.get_by_role("link", name="Open viewer").first
            link.wait_for(state="visible", timeout=60000)
            viewer_url = link.get_attribute("href") or ""
            result["viewer_url"] = viewer_url
            ui.screenshot(path=str(out / "dashboard-running.png"))
            view = browser.new_page(viewport={"width": 1280, "height": 900})
            t0 = time.monotonic()
            view.goto(viewer_url if viewer_url.startswith("http") else dashboard.split("/ui/")[0] + viewer_url)
            result.update(watch_colour(view, out / "dashboard-viewer.png", want, t0, limit))
            ui.bring_to_front()
            ui.locator("#rows .state").filter(has_text="Running").wait_for(timeout=120000)
            result.update(thumb_colour(ui, want, limit))
            ui.screenshot(path=str(out / "dashboard-thumbnail.png"))
            result["progress"] = ui.evaluate("() => Array.from(window.seen)")
            ui.get_by_role("button", name="End session").first.click()
            ui.get_by_text("No sessions").wait_for(state="visible", timeout=120000)
            result["emptied"] = True
            ended = ui.locator("#history-rows tr").first
            ended.wait_for(timeout=120000)
            result["ended_row"] = ended.inner_text()
            ui.screenshot(path=str(out / "dashboard-history.png"))
            href = ended.get_by_role("link", name="Receipt", exact=False).get_attribute("href") or ""
            ui.goto(dashboard + href)
            result["receipt"] = ui.locator("#verdict").inner_text()
        finally:
            browser.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
