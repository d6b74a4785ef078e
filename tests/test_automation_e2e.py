"""The automation endpoint end to end: a real Chromium guest (QEMU, TCG here) started through dispod with
"automation": true, driven by Playwright for Python on the host over its cdp_url (tests/automation_client.py, in
the netns where dispod listens), with a page from the test's "internet" netns. The browser is the guest's (its
file:///etc/hostname is the guest's name), a second client attaches at the same time, the guest's debugging
port does not answer on the guest's network address, and after DELETE the host listing equals the one before.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dispo import guest
from tests.dispodworld import start_dispod, stop_dispod, wait_state
from tests.guests import COLOUR_PAGE as PAGE
from tests.guests import state_listing
from tests.netns import INTERNET, INTERNET_PORT, REPO, NetWorld, in_ns

pytestmark = [pytest.mark.root, pytest.mark.vm]

PAGE_URL = f"http://{INTERNET}:{INTERNET_PORT}/page.html"
CLIENT_TIMEOUT_S = 900


def test_playwright_drives_the_guests_chromium_over_cdp(browser_world: NetWorld) -> None:
    w = browser_world
    assert "<title>dispo-test-page</title>" in PAGE
    before = state_listing(w)
    d = start_dispod(w)
    try:
        created = d.client.create_session({"profile": "chromium", "automation": True, "url": "about:blank"})
        sid, url = created["id"], created["cdp_url"]
        assert url.startswith(f"ws://127.0.0.1:{d.port}/automation/{sid}/"), created
        status = wait_state(d, sid, "running")
        address = str(status["address"])
        # Nothing on the network reaches the browser's debugging port: only dispod, through the session's SSH.
        probe = in_ns(w.host, "curl", "-s", "--max-time", "5", f"http://{address}:{guest.DEBUG_PORT}/json/version",
                      check=False)
        assert probe.returncode != 0 and not probe.stdout, probe
        client = subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m",
                                 "tests.automation_client", url, PAGE_URL], capture_output=True, text=True, cwd=REPO,
                                stdin=subprocess.DEVNULL, timeout=CLIENT_TIMEOUT_S, check=False)
        assert client.returncode == 0, client.stderr[-3000:] + d.log.read_text()[-3000:]
        result = json.loads(client.stdout.strip().splitlines()[-1])
        print("automation e2e:", result)
        assert result["title"] == "dispo-test-page", result
        assert result["hostname"] == f"dispo-{sid}", result  # the browser is the guest's
        assert PAGE_URL in result["second_sees"] and result["second_title"] == "dispo-test-page", result
        # The guest's debugging port still answers no one else after the clients came and went.
        probe = in_ns(w.host, "curl", "-s", "--max-time", "5", f"http://{address}:{guest.DEBUG_PORT}/json/version",
                      check=False)
        assert probe.returncode != 0 and not probe.stdout, probe
        ended = d.client.delete(sid, wait=True)
        assert ended["state"] == "ended", ended
    finally:
        stop_dispod(d)
    assert state_listing(w) == before

