"""A program that drives a dispo session's browser over its cdp_url (Playwright for Python, on the host), run
inside the netns where dispod listens: `python -m tests.automation_client CDP_URL PAGE_URL`. Prints JSON: the
page's title, what the guest's file:///etc/hostname shows, and what a second client, attached at the same
time, sees of the first one's page.
"""

from __future__ import annotations

import json
import sys
import time

from playwright.sync_api import sync_playwright

TIMEOUT_MS = 240_000  # under TCG the browser's first answers take a while


def main(cdp_url: str, page_url: str) -> None:
    out: dict[str, object] = {}
    with sync_playwright() as p:
        t = time.monotonic()
        browser = p.chromium.connect_over_cdp(cdp_url, timeout=TIMEOUT_MS)
        out["connect_s"] = round(time.monotonic() - t, 2)
        out["version"] = browser.version
        context = browser.contexts[0]
        page = context.pages[0] if context.pages else context.new_page()
        t = time.monotonic()
        page.goto(page_url, timeout=TIMEOUT_MS)
        out["title"] = page.title()
        out["goto_s"] = round(time.monotonic() - t, 2)
        # A second client, attached while the first one is: it finds the same browser and the first one's page.
        second = p.chromium.connect_over_cdp(cdp_url, timeout=TIMEOUT_MS)
        out["second_sees"] = [pg.url for c in second.contexts for pg in c.pages]
        out["second_title"] = next((pg.title() for c in second.contexts for pg in c.pages if pg.url == page_url), None)
        page.goto("file:///etc/hostname", timeout=TIMEOUT_MS)
        out["hostname"] = page.inner_text("body").strip()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
