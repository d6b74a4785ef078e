"""The automation endpoint end to end (QEMU, TCG here): Playwright for Python on the host drives real Chromium
guests over their cdp_url, each session started through the SDK (`dispo.connect(...)` on dispod's socket), pages
from the test's "internet" netns.

One automation template is built (`dispo template build chromium --automation`: the browser booted cold with
its debugging port on the guest's loopback, then saved), and two sessions run at once:

- A, restored from that template (its forward to the port made at restore), with log_requests, carries the
  acceptance: a page and its title, a download whose sha256 is the served file's (the SDK's `s.download`), the
  guest's own file:///etc/hostname, a second client attached at the same time, a client that reconnects finding
  its page, and a request log holding only what the program caused (quiet holds);
- B, booted cold (the path of every automation session without a template), is the other guest: Playwright
  reaches its browser too, and from B the port of A does not answer, nor B's own on its network address (only
  on its loopback, which only the session's SSH forward reaches).

From the host's addresses and the "internet" the port answers no one either, and after both sessions end the
host listing equals the one before and both receipts are clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import dispo
from dispo import guest
from tests.dispodworld import start_dispod, stop_dispod
from tests.guests import COLOUR_PAGE as PAGE
from tests.guests import chromium_profile, state_listing
from tests.netns import HOST_LAN, HOST_UP, INTERNET, INTERNET_PORT, REPO, NetWorld, in_ns

pytestmark = [pytest.mark.root, pytest.mark.vm]

PAGE_URL = f"http://{INTERNET}:{INTERNET_PORT}/page.html"
DOWNLOAD_URL = f"http://{INTERNET}:{INTERNET_PORT}/dl.html"
DOWNLOAD_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>dispo-download</title></head>
<body><a id="d" href="blob.bin" download="blob.bin">the file</a></body></html>
"""
CLIENT_TIMEOUT_S = 900
PORT = guest.DEBUG_PORT


def _client(w: NetWorld, cdp_url: str, *pages: str) -> dict[str, Any]:
    """tests/automation_client.py in the netns where dispod listens: its JSON."""
    client = subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m",
                             "tests.automation_client", cdp_url, *pages], capture_output=True, text=True, cwd=REPO,
                            stdin=subprocess.DEVNULL, timeout=CLIENT_TIMEOUT_S, check=False)
    assert client.returncode == 0, client.stderr[-3000:]
    result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
    print("automation e2e:", result)
    return result


def _answers_from_ns(ns: str, address: str) -> bool:
    p = in_ns(ns, "curl", "-s", "--max-time", "5", f"http://{address}:{PORT}/json/version", check=False)
    return p.returncode == 0 or bool(p.stdout)


def _answers_from_guest(w: NetWorld, sid: str, address: str) -> bool:
    """Whether a TCP connection from the guest of session `sid` to address:PORT is accepted (bash's /dev/tcp)."""
    p = w.dispo("ssh", sid, "--", "timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{PORT}", timeout=60)
    assert p.returncode in (0, 1, 124), p.stderr  # 1: refused, 124: no answer; anything else: the probe broke
    return p.returncode == 0


def _complete_download(s: dispo.Session, name: str) -> None:
    deadline = time.monotonic() + 120
    while not any(f.name == name and f.complete for f in s.downloads()):
        assert time.monotonic() < deadline, s.downloads()
        time.sleep(0.5)


def test_playwright_drives_a_restored_and_a_cold_automation_session(browser_world: NetWorld, tmp_path: Path) -> None:
    w = browser_world
    assert "<title>dispo-test-page</title>" in PAGE
    blob = os.urandom(300_000)
    (w.root / "www-inet" / "blob.bin").write_bytes(blob)
    (w.root / "www-inet" / "dl.html").write_text(DOWNLOAD_PAGE)
    chromium_profile(w, "chromium", f"http://{INTERNET}:{INTERNET_PORT}")
    built = w.dispo("template", "build", "chromium", "--automation", timeout=900)
    assert built.returncode == 0, built.stderr
    assert "template profile-chromium+automation" in built.stdout, built.stdout
    before = state_listing(w)
    d = start_dispod(w)
    try:
        with dispo.connect(f"unix:{w.state_dir / 'dispod.sock'}") as api:
            with api.session("chromium", automation=True, log_requests=True, start="warm", url="about:blank") as a:
                a.wait_ready()
                assert a.cdp_url is not None and a.cdp_url.startswith(f"ws://127.0.0.1:{d.port}/automation/{a.id}/")
                assert a.status["start"] == "restore" and a.status["template"] == "profile-chromium+automation"
                got = _client(w, a.cdp_url, PAGE_URL, DOWNLOAD_URL)
                assert got["title"] == "dispo-test-page", got
                assert got["hostname"] == f"dispo-{a.id}", got  # the browser is the guest's (its own identity)
                assert PAGE_URL in got["second_sees"] and got["second_title"] == "dispo-test-page", got
                assert got["reconnect_finds"] == "dispo-test-page", got
                _complete_download(a, "blob.bin")
                saved = a.download("blob.bin", to=tmp_path)
                assert hashlib.sha256(saved.read_bytes()).hexdigest() == hashlib.sha256(blob).hexdigest()

                # B: booted cold, the other guest.
                with api.session("chromium", automation=True, start="cold", url="about:blank") as b:
                    b.wait_ready()
                    assert b.status["start"] == "boot" and b.cdp_url is not None
                    cold = _client(w, b.cdp_url, PAGE_URL)
                    assert cold["title"] == "dispo-test-page" and cold["hostname"] == f"dispo-{b.id}", cold
                    a_addr, b_addr = str(a.refresh()["address"]), str(b.refresh()["address"])
                    # The port listens on the guest's loopback (the probe works) and on nothing else.
                    assert _answers_from_guest(w, b.id, "127.0.0.1")
                    assert not _answers_from_guest(w, b.id, b_addr)
                    assert not _answers_from_guest(w, b.id, a_addr)
                    assert not _answers_from_guest(w, a.id, b_addr)
                    for ns, address in ((w.host, a_addr), (w.host, b_addr), (w.internet, a_addr),
                                        (w.host, "127.0.0.1"), (w.host, HOST_LAN), (w.host, HOST_UP)):
                        assert not _answers_from_ns(ns, address), (ns, address)
                assert b.receipt()["clean"] is True, b.receipt()
                # Quiet holds with automation on: the guest asked for the test pages and nothing else (besides
                # the test's own probe from A to B's port).
                requests = {(r["kind"], r["dest"], r["port"]) for r in a.refresh()["requests"]}
                assert requests == {("tcp", INTERNET, INTERNET_PORT), ("tcp", b_addr, PORT)}, requests
            receipt = a.receipt()
            assert receipt["clean"] is True and receipt["leftovers"] == [], receipt
    finally:
        stop_dispod(d)
    assert state_listing(w) == before
