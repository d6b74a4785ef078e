"""A program that drives a dispo session's browser over its cdp_url (Playwright for Python, on the host), run
inside the netns where dispod listens:

    python -m tests.automation_client CDP_URL PAGE_URL [DOWNLOAD_PAGE_URL]

Prints JSON: the page's title, what the guest's file:///etc/hostname shows, what a second client, attached at
the same time, sees of the first one's page, and, after this client disconnected and connected again, whether
it finds its page. With DOWNLOAD_PAGE_URL it also clicks that page's download link (#d), the browser saving
the file as the session's profile says (its ~/Downloads; the test fetches it through dispo's downloads API).
"""

from __future__ import annotations

import json
import sys
import time

from playwright.sync_api import Browser, Playwright, sync_playwright

TIMEOUT_MS = 240_000  # under TCG the browser's first answers take a while


def _connect(p: Playwright, cdp_url: str) -> Browser:
    return p.chromium.connect_over_cdp(cdp_url, timeout=TIMEOUT_MS)


def main(cdp_url: str, page_url: str, download_url: str = "") -> None:
    out: dict[str, object] = {}
    with sync_playwright() as p:
        t = time.monotonic()
        browser = _connect(p, cdp_url)
        out["connect_s"] = round(time.monotonic() - t, 2)
        out["version"] = browser.version
        context = browser.contexts[0]
        page = context.pages[0] if context.pages else context.new_page()
        t = time.monotonic()
        page.goto(page_url, timeout=TIMEOUT_MS)
        out["title"] = page.title()
        out["goto_s"] = round(time.monotonic() - t, 2)
        # A second client, attached while the first one is: it finds the same browser and the first one's page.
        second = _connect(p, cdp_url)
        out["second_sees"] = [pg.url for c in second.contexts for pg in c.pages]
        out["second_title"] = next((pg.title() for c in second.contexts for pg in c.pages if pg.url == page_url), None)
        other = context.new_page()
        if download_url:
            # Playwright points a CDP browser's downloads at a directory of the client's machine; "default"
            # gives them back to the browser, which saves them where the profile says (~/Downloads).
            browser.new_browser_cdp_session().send("Browser.setDownloadBehavior", {"behavior": "default"})
            other.goto(download_url, timeout=TIMEOUT_MS)
            other.click("#d", timeout=TIMEOUT_MS)
            out["clicked"] = True
        other.goto("file:///etc/hostname", timeout=TIMEOUT_MS)
        out["hostname"] = other.inner_text("body").strip()
    # This client is gone (its connections closed with its driver); connecting again finds its page.
    with sync_playwright() as p:
        again = _connect(p, cdp_url)
        found = [pg for c in again.contexts for pg in c.pages if pg.url == page_url]
        out["reconnect_finds"] = found[0].title() if found else None
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
