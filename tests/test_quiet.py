"""Quiet browsers end to end: from `dispo run PROFILE URL` until 60 s after the page is visible in the viewer,
the guest's only traffic is the DNS lookup of the page's host and the connections to the page's server.

The test's "internet" netns runs a DNS server that logs every query (the session's only resolver) and a web
server that logs every request with its headers. tcpdump captures every packet in the "host" netns from
before `dispo run` starts (IPv6 is off there, so any IPv6 packet is the guest's); what the guest sent that is
not a DNS query to the test's server, a connection to the page's server, or its side of the host's SSH
connection is printed and fails the test. The same session must show one tab (the URL) and no prompt: the
whole page area of the viewer has the page's colour 60 s after it appeared, and the browser's own record of
its tabs (Chromium's DevTools list, Firefox's session store) holds one page. `--log-requests` must list what
the capture saw, the receipt must count it, and the page must see the host's time zone and language.

Firefox's session is also an automation session (through dispod, `dispo run firefox --automation`): once the
page shows, a WebDriver BiDi client (tests/bidi_client.py) on its bidi_url starts a BiDi session, finds the
tab and navigates it to a second page of the same server, waiting for the load, and reads its title. Every
assertion above holds with automation on: the only traffic is what the page and the client caused.

The two browsers run in one test, each in a world of its own: Firefox starts once Chromium's page shows, so
Firefox's boot falls in Chromium's quiet window (a browser idling on a page) instead of after it.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispo import profiles
from dispo.net.pool import mac_for
from tests.dispodworld import Dispod, start_dispod, stop_dispod
from tests.guests import (
    GuestImages,
    guest_world,
    session_id,
    shot,
    spawn_run,
    state_listing,
    viewer_url,
    wait_listening,
)
from tests.netns import INTERNET, INTERNET_OTHER, PYTHON, REPO, NetWorld, in_ns
from tests.tiers import tier

pytestmark = [pytest.mark.root, pytest.mark.vm]

PAGE_HOST = "page.dispo.test"
PAGE_PORT = 8090
DNS = INTERNET_OTHER
BLUE = "1e90ff"
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dispo quiet page</title></head>
<body style="margin:0;background:#1e90ff">
<script>
var tz = Intl.DateTimeFormat().resolvedOptions().timeZone;
new Image().src = "/report?tz=" + encodeURIComponent(tz) + "&lang=" + encodeURIComponent(navigator.language);
</script></body></html>
"""
BIDI_PAGE = PAGE.replace("dispo quiet page", "dispo bidi page")  # the page the BiDi client navigates to
QUIET_S = 60  # watched after the page is visible
STORE_S = 20  # Firefox writes its session store 15 s after a change
HOST_TZ, HOST_LANG = "America/Denver", "de_DE.UTF-8"  # the "host's" settings dispo must pass on
DEVTOOLS_PORT = 9222
# Chromium first: its quiet window, a browser idling on a page, covers Firefox's boot (at most one guest boots at
# a time on the 2-core CI machine, and the two windows overlap instead of following each other).
BROWSERS = ("chromium", "firefox")


@pytest.fixture
@tier("browser")
def quiet_worlds(tmp_path: Path, guest_images: GuestImages) -> Iterator[dict[str, NetWorld]]:
    """A world of its own for each browser: its own namespaces, logging DNS and web servers and capture."""
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "chromium", "convert", "tcpdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    with contextlib.ExitStack() as stack:
        yield {b: stack.enter_context(_quiet_world(tmp_path / b, guest_images)) for b in BROWSERS}


@contextlib.contextmanager
def _quiet_world(root: Path, guest_images: GuestImages) -> Iterator[NetWorld]:
    with guest_world(root, guest_images) as w:
        # No IPv6 in the host netns: then every IPv6 packet captured there is the guest's.
        for key in ("all", "default", "lo", "up0", "lan0"):
            in_ns(w.host, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")
        www = w.root / "www-quiet"
        www.mkdir()
        (www / "quiet.html").write_text(PAGE)
        (www / "bidi.html").write_text(BIDI_PAGE)
        w.spawn(["nsenter", f"--net=/run/netns/{w.internet}", PYTHON, "-m", "tests.logging_servers", "dns", DNS,
                 w.root / "dns.log", f"{PAGE_HOST}={INTERNET}"], cwd=REPO, stderr=(w.root / "dns.err").open("w"))
        w.spawn(["nsenter", f"--net=/run/netns/{w.internet}", PYTHON, "-m", "tests.logging_servers", "http",
                 INTERNET, str(PAGE_PORT), www, w.root / "http.log"], cwd=REPO,
                stderr=(w.root / "http.err").open("w"))
        wait_listening(w.internet, "u", DNS, 53)
        wait_listening(w.internet, "t", INTERNET, PAGE_PORT)
        # The session's one resolver is the logging DNS server; profiles here may override the built-in ones.
        profiles_dir = w.root / "profiles"
        profiles_dir.mkdir()
        w.config.write_text(f'profiles_dir = "{profiles_dir}"\n[net]\nlink = "tap"\ndns = "{DNS}"\n')
        yield w


def _log_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _packets(pcap: Path, expr: str, *flags: str) -> list[str]:
    """tcpdump's one-line view of the captured packets matching `expr` (a pcap filter)."""
    p = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-tt", *flags, expr], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    return [line for line in p.stdout.splitlines() if line.strip()]


def _lz4_length(src: bytes, i: int, n: int) -> tuple[int, int]:
    """An LZ4 length: `n` from the token, plus bytes while they are 255 when it is 15; (length, next index)."""
    if n == 15:
        while True:
            b = src[i]
            i += 1
            n += b
            if b != 255:
                break
    return n, i


def _mozlz4(data: bytes) -> bytes:
    """Firefox's session-store format: "mozLz40\\0", the size, then one LZ4 block."""
    assert data[:8] == b"mozLz40\0", data[:8]
    size = struct.unpack("<I", data[8:12])[0]
    src, out, i = data[12:], bytearray(), 0
    while i < len(src):
        token = src[i]
        n, i = _lz4_length(src, i + 1, token >> 4)
        out += src[i:i + n]
        i += n
        if i >= len(src):
            break
        offset = src[i] | src[i + 1] << 8
        m, i = _lz4_length(src, i + 2, token & 15)
        for _ in range(m + 4):
            out.append(out[-offset])
    assert len(out) == size, (len(out), size)
    return bytes(out)


def _tabs(w: NetWorld, sid: str, browser: str) -> list[str]:
    """The URLs of the open tabs, as the browser itself records them."""
    if browser == "chromium":
        p = w.dispo("ssh", sid, "--", "curl", "-s", "--max-time", "10", f"http://127.0.0.1:{DEVTOOLS_PORT}/json/list",
                    timeout=60)
        assert p.returncode == 0, p.stderr
        return [str(t["url"]) for t in json.loads(p.stdout) if t.get("type") == "page"]
    # Firefox writes its session store 15 s after a change; the test waited longer than that.
    p = w.dispo("ssh", sid, "--", "sh", "-c", "cat $(find ~/.mozilla ~/.config/mozilla -name recovery.jsonlz4 "
                                              "2>/dev/null | head -n 1) | base64 -w0", timeout=60)
    assert p.returncode == 0 and p.stdout, p.stderr
    store = json.loads(_mozlz4(base64.b64decode(p.stdout)))
    return [str(t["entries"][t["index"] - 1]["url"]) for win in store["windows"] for t in win["tabs"]]


def _bidi_url(run: subprocess.Popen[str], log: Path) -> str:
    """The bidi_url `dispo run --automation` prints on stdout after the viewer's."""
    assert run.stdout is not None
    while line := run.stdout.readline():
        if line.startswith("ws://"):
            return line.strip()
    raise AssertionError(f"dispo run printed no bidi_url: {log.read_text()}")


def _drive_bidi(w: NetWorld, bidi_url: str, page_url: str) -> dict[str, object]:
    """tests/bidi_client.py, where dispod listens: session.new, getTree, navigate (wait complete), the title."""
    p = subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m", "tests.bidi_client", bidi_url,
                        page_url], capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    found: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return found


@dataclass
class Watched:
    """One browser's session under watch, from its start until its checks."""
    browser: str
    w: NetWorld
    tmp: Path
    run: subprocess.Popen[str]
    dump: subprocess.Popen[str]
    dispod: Dispod | None
    log: Path
    pcap: Path
    sid: str
    guest: str
    viewer: str
    end_url: str
    visible: float
    before: dict[str, object]


def _start(w: NetWorld, guest_images: GuestImages, tmp: Path, browser: str) -> Watched:
    """`dispo run BROWSER URL` under a capture, until its page is visible in the viewer (and, for Firefox, a
    WebDriver BiDi client drove it to a second page)."""
    tmp.mkdir(parents=True, exist_ok=True)
    guest_images.give(w, browser)
    if browser == "chromium":
        # The built-in profile plus DevTools on the guest's loopback, to ask Chromium for its tabs (Chromium
        # serves DevTools only for a user-data-dir of its own: a fresh one, as every session's is).
        builtin = profiles.find("chromium")
        command = [*builtin.command, f"--remote-debugging-port={DEVTOOLS_PORT}",
                   "--user-data-dir=/home/user/.config/chromium-devtools"]
        text = (profiles.BUILTIN_DIR / "chromium.toml").read_text()
        text = re.sub(r"(?ms)^command = \[.*?\]$", "command = " + json.dumps(command), text)
        (w.root / "profiles" / "chromium.toml").write_text(text)
    env = dict(w.env(), TZ=HOST_TZ, LANG=HOST_LANG, LC_ALL="", LC_MESSAGES="")
    before = state_listing(w)
    # Firefox's session is an automation session, served by dispod (which gives its bidi_url): the quiet policies
    # must hold with WebDriver BiDi on, and a BiDi client drives it. dispod has the host's settings to pass on.
    dispod = start_dispod(w, env=env) if browser == "firefox" else None
    pcap = tmp / "guest.pcap"
    dump = w.spawn(["nsenter", f"--net=/run/netns/{w.host}", "tcpdump", "-i", "any", "-n", "-U", "-w", pcap],
                   stderr=subprocess.PIPE)
    assert dump.stderr is not None
    while "listening on" not in (line := dump.stderr.readline()):  # after "data link type ..."
        assert line, "tcpdump did not start"

    url = f"http://{PAGE_HOST}:{PAGE_PORT}/quiet.html"
    log = tmp / "run.log"
    run = spawn_run(w, browser, url, "--log-requests", *(["--automation"] if dispod else []), log=log, env=env)
    viewer = viewer_url(run, log)
    bidi_url = _bidi_url(run, log) if dispod else ""
    sid = session_id(w, run, log)
    guest = str(json.loads((w.state_dir / "sessions" / sid / "ssh.json").read_text())["address"])
    seen = shot(w, viewer, f"quiet-{browser}.png", BLUE)
    assert seen["seen"], f"the page did not show in the viewer: {seen}"
    end_url, visible = url, time.monotonic()
    if dispod:  # a program drives the browser: WebDriver BiDi through dispod's relay, to a page of the same server
        end_url = f"http://{PAGE_HOST}:{PAGE_PORT}/bidi.html"
        bidi = _drive_bidi(w, bidi_url, end_url)
        print(f"firefox over WebDriver BiDi ({time.monotonic() - visible:.1f} s): {bidi}")
        assert bidi["browser"] == "firefox" and bidi["url"] == end_url, bidi
        assert bidi["title"] == "dispo bidi page", bidi
    return Watched(browser, w, tmp, run, dump, dispod, log, pcap, sid, guest, viewer, end_url, visible, before)


def _check(s: Watched) -> None:
    """The rest of the window, then what the session did in it: its traffic, tabs, screen, names and receipt."""
    browser, w, run, sid, guest = s.browser, s.w, s.run, s.sid, s.guest
    # Watched QUIET_S after the page was visible (the BiDi client's time counts); Firefox, long enough after the
    # last navigation to have written its session store (15 s after a change).
    time.sleep(max(QUIET_S - (time.monotonic() - s.visible), STORE_S if browser == "firefox" else 0))
    late = shot(w, s.viewer, f"quiet-{browser}-60s.png", BLUE, grid=True)
    tabs = _tabs(w, sid, browser)
    # Nothing of the host's identity: the guest's name is the session's, its user dispo's.
    who = w.dispo("ssh", sid, "--", "sh", "-c", "hostname; id -un", timeout=60)
    assert who.stdout.split() == [f"dispo-{sid}", "user"], who.stdout + who.stderr

    os.kill(run.pid, signal.SIGTERM)  # nsenter exec()s dispo: this is dispo itself
    assert run.wait(120) == 128 + signal.SIGTERM, s.log.read_text()
    s.dump.send_signal(signal.SIGINT)
    s.dump.wait(30)
    out = s.log.read_text()
    if s.dispod:
        stop_dispod(s.dispod)
    assert state_listing(w) == s.before

    # The traffic: nothing but the page's DNS lookup and its server (and the guest's side of SSH).
    allowed = (f"ip and src host {guest} and not (tcp src port 22) and not (udp and dst host {DNS} and dst port 53) "
               f"and not (tcp and dst host {INTERNET} and dst port {PAGE_PORT})")
    # IPv6 by the guest's MAC (the capture shows each packet's source link address): the host's own devices
    # may send theirs (ifb0 wakes up with a router solicitation).
    mac = mac_for(ipaddress.IPv4Address(guest))
    other = _packets(s.pcap, allowed) + [p for p in _packets(s.pcap, "ip6", "-e") if mac in p]
    dns_names = {str(q.get("name", "")).rstrip(".") for q in _log_lines(w.root / "dns.log")}
    queries = _packets(s.pcap, f"src host {guest} and udp and dst port 53")
    assert queries, "no DNS query seen: the capture does not work"
    print(f"{browser}: DNS names asked: {sorted(dns_names)}; other packets: {len(other)}")
    for line in other[:50]:
        print(f"  other: {line}")
    assert dns_names == {PAGE_HOST}, f"{browser} looked up names besides the page's: {sorted(dns_names)}"
    assert not other, f"{browser} sent {len(other)} packets besides the page's: {other[:10]}"
    hits = _log_lines(w.root / "http.log")
    paths = [str(h["path"]) for h in hits]
    assert "/quiet.html" in paths and any(p.startswith("/report?") for p in paths), paths
    assert ("/bidi.html" in paths) == bool(s.dispod), paths

    # One tab, the URL (where the BiDi client went); no prompt, bar or bubble over the page.
    assert tabs == [s.end_url], f"{browser} has tabs {tabs}"
    assert late["seen"] and not late.get("grid_off"), f"something covers the page: {late}"

    # The host's time zone and language, as the page sees them.
    report = next(h for h in hits if str(h["path"]).startswith("/report?"))
    assert "tz=America%2FDenver" in str(report["path"]), report
    headers = report["headers"]
    assert isinstance(headers, dict) and str(headers.get("Accept-Language", "")).startswith("de-DE"), report

    # --log-requests listed what the capture saw, and the receipt counts it.
    assert f"dns A {PAGE_HOST} (asked {DNS})" in out, out
    assert f"tcp {INTERNET}:{PAGE_PORT}" in out, out
    receipt = json.loads(w.dispo("receipt", sid, "--json").stdout)
    assert receipt["requests"]["tcp"] >= 1 and receipt["requests"]["dns"] >= 1, receipt
    assert set(receipt["requests"]) <= {"tcp", "dns"}, receipt


def test_quiet_browsers(quiet_worlds: dict[str, NetWorld], guest_images: GuestImages, tmp_path: Path) -> None:
    """Chromium, then Firefox while Chromium's window runs; each checked when its own window is over."""
    watched = [_start(quiet_worlds[b], guest_images, tmp_path / b, b) for b in BROWSERS]
    for s in watched:
        _check(s)
