"""Open a dispo viewer URL in a real browser (Playwright + Debian's chromium) and screenshot it until the
guest's screen shows the expected colour; optionally press "End session". Run inside the netns where the
viewer listens: `python -m tests.viewer_shot URL OUT.png RRGGBB TIMEOUT [--end] [--grid]`. Prints JSON. URL "-": the
browser starts first, prints "ready", then reads the URL from stdin (so a timing need not include its start).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

TOLERANCE = 48  # noVNC may ask for lossy (JPEG) encodings: colours come back close, not exact


def pixel(png: Path, x: int, y: int) -> tuple[int, ...]:
    fmt = ",".join(f"%[fx:int(255*p{{{x},{y}}}.{c})]" for c in "rgb")
    out = subprocess.run(["convert", str(png), "-format", fmt, "info:"], capture_output=True, text=True, check=True)
    return tuple(int(c) for c in out.stdout.strip().split(","))


def pixels(png: Path, points: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    """The colours at many points, in one `convert` run."""
    fmt = ";".join(",".join(f"%[fx:int(255*p{{{x},{y}}}.{c})]" for c in "rgb") for x, y in points)
    out = subprocess.run(["convert", str(png), "-format", fmt, "info:"], capture_output=True, text=True, check=True)
    return [tuple(int(c) for c in part.split(",")) for part in out.stdout.strip().split(";")]


# The guest browser's page area in the viewer: below its tab strip and toolbar, right of noVNC's control bar
# (open for a few seconds after connecting).
GRID = [(x, y) for x in range(100, 1241, 114) for y in range(130, 881, 75)]


def close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOLERANCE for x, y in zip(a, b, strict=True))


def watch_colour(page: Page, out: Path, want: tuple[int, ...], t0: float, timeout: float) -> dict[str, object]:
    """Screenshot the viewer page until the guest's screen shows `want` at points spread over its lower middle
    (below the guest browser's own toolbar), or `timeout` seconds after t0."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.frame_locator("#vnc").locator("canvas").wait_for(state="visible", timeout=timeout * 1000)
    except PlaywrightTimeout:  # no display: what the viewer page says instead (the session's step or error)
        page.screenshot(path=str(out))
        says = page.locator("#progress").inner_text() if page.locator("#progress").count() else ""
        return {"seen": False, "no_display": True, "page_says": says, "seconds": round(time.monotonic() - t0, 1)}
    points = [(640, 500), (400, 600), (880, 600), (640, 700)]
    got: list[tuple[int, ...]] = []
    seen: dict[str, object] = {"seen": False, "canvas_at": time.time()}  # the display is up (the VNC connected)
    while time.monotonic() - t0 < timeout:
        page.screenshot(path=str(out))
        got = pixels(out, points)
        if all(close(g, want) for g in got):
            seen.update(seen=True, seen_at=time.time())  # wall clock, for timings across processes
            break
        time.sleep(0.5)
    return {**seen, "pixels": got, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    url, out, hex_rgb, timeout = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    end = "--end" in sys.argv[5:]
    grid = "--grid" in sys.argv[5:]  # once seen: is the whole page area the colour (no prompt, bar or bubble)?
    want = tuple(int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4))
    result: dict[str, object] = {"seen": False}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            if url == "-":  # started ahead (a benchmark): say so, then take the URL from stdin
                print("ready", flush=True)
                url = sys.stdin.readline().strip()
            t0 = time.monotonic()
            page.goto(url)
            result.update(watch_colour(page, out, want, t0, timeout))
            if grid and result.get("seen"):
                page.screenshot(path=str(out))
                got = pixels(out, GRID)
                result["grid_off"] = [(*pt, *rgb) for pt, rgb in zip(GRID, got, strict=True) if not close(rgb, want)]
            if end:
                result["end_at"] = time.time()
                page.click("#end")
                page.wait_for_selector("text=Session ended", timeout=10000)
                result["ended"] = True
        finally:
            browser.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
