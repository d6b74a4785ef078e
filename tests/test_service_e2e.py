"""dispod end to end on real guests (QEMU, TCG here) in namespaces the test builds (tests/netns.py): the
REST API, `dispo run/ls` through dispod, kill -9 of dispod and the reclaim by the next one, and the
dashboard driven in a real browser. After each test an independent listing of host objects (links,
nftables, disks, journals, state files, QEMU processes) equals the one taken before dispod started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dispodworld import start_dispod, stop_dispod, wait_state
from tests.guests import (
    ARTIFACTS,
    COLOUR_PAGE,
    GREEN,
    SHOW_TIMEOUT_S,
    GuestImages,
    guest_world,
    qemu_processes,
    state_listing,
)
from tests.netns import INTERNET, INTERNET_PORT, PAGE, REPO, NetWorld
from tests.tiers import tier

pytestmark = [pytest.mark.root, pytest.mark.vm]

URL = f"http://{INTERNET}:{INTERNET_PORT}/index.txt"


@pytest.fixture
@tier("vm")
def world(tmp_path: Path, guest_images: GuestImages) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    with guest_world(tmp_path / "w", guest_images, "minimal") as w:
        yield w


def test_api_and_cli_through_dispod(world: NetWorld) -> None:
    w = world
    before = state_listing(w)
    d = start_dispod(w)
    try:
        # POST a command that fetches the "internet" page through NAT and exits 7.
        created = d.client.create_session({"image": "minimal", "command": [
            "sh", "-c", f"curl -sS --max-time 20 {URL} > /dev/null && exit 7"]})
        assert created["state"] == "starting"
        sid = str(created["id"])
        ended = {}
        for event in d.client.events(session=sid):
            if event.kind.value == "ended":
                ended = dict(event.fields)
                break
        final = d.client.session(sid)
        assert final["state"] == "ended" and final["exit_status"] == 7 and ended["exit_status"] == 7, final
        assert "exited with status 7" in str(final["end_reason"])
        assert state_listing(w) == before

        # `dispo run` goes through dispod (its socket exists): same output, same exit status.
        run = w.dispo("run", "--image", "minimal", "--", "sh", "-c", f"curl -sS --max-time 20 {URL}; exit 3",
                      timeout=300)
        assert run.returncode == 3, run.stderr
        assert run.stdout == PAGE and "ready in" in run.stderr, run.stderr
        owned = [s for s in d.client.sessions(all=True) if s["image"] == "minimal"]
        assert len(owned) == 2, owned  # the CLI's session was dispod's

        # `dispo ls` shows dispod's sessions; `dispo stop` ends one through dispod.
        held = d.client.create_session({"image": "minimal", "command": ["sleep", "600"]})
        hid = str(held["id"])
        wait_state(d, hid, "running")
        ls = w.dispo("ls").stdout
        row = next(line for line in ls.splitlines() if line.startswith(hid))
        assert "dispod" in row and "running" in row, ls
        stopped = w.dispo("stop", hid, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert d.client.session(hid)["state"] == "ended"
        assert state_listing(w) == before
    finally:
        stop_dispod(d)
    assert state_listing(w) == before
    assert not (w.state_dir / "dispod.sock").exists()


def test_kill_9_of_dispod_then_the_next_one_reclaims(world: NetWorld) -> None:
    w = world
    before = state_listing(w)
    d = start_dispod(w)
    try:
        sid = str(d.client.create_session({"image": "minimal", "command": ["sleep", "600"]})["id"])
        wait_state(d, sid, "running")
        assert qemu_processes(w), "no guest runs"
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        deadline = time.monotonic() + 30
        while qemu_processes(w):  # the VMM dies with its owner (parent-death signal), nobody runs gc
            assert time.monotonic() < deadline, qemu_processes(w)
            time.sleep(0.2)
        left = state_listing(w)
        assert left != before and f"dsp-{sid}" in str(left["links"])  # (the tap, rules, lease, disk wait)
        d = start_dispod(w, "dispod-2")  # documented: a new dispod tears down what the old one left
        assert sid not in {str(s["id"]) for s in d.client.sessions()}
        gone = d.client.session(sid)
        assert gone["state"] == "ended" and "reclaimed" in str(gone["end_reason"]), gone
        assert state_listing(w) == before
    finally:
        stop_dispod(d)
    assert state_listing(w) == before


@pytest.mark.browser  # a Chromium guest
def test_dashboard_start_view_end(world: NetWorld, guest_images: GuestImages, chromium_template: str,
                                  tmp_path: Path) -> None:
    """The dashboard's start, view and end of a browser session. The browser's boot is not the subject (the
    quiet tests and test_browser_features boot it cold): the session is a clone of the chromium template."""
    w = world
    guest_images.give(w, "chromium")
    guest_images.give_template(w, chromium_template)
    (w.root / "www-inet" / "page.html").write_text(COLOUR_PAGE)
    before = state_listing(w)
    d = start_dispod(w)
    try:
        dashboard = (w.state_dir / "dispod.url").read_text().strip()
        assert dashboard.startswith(f"http://127.0.0.1:{d.port}/"), dashboard
        ARTIFACTS.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "tests.dashboard_shot", dashboard,
                f"http://{INTERNET}:{INTERNET_PORT}/page.html?check", str(ARTIFACTS), GREEN, str(SHOW_TIMEOUT_S)]
        shot = subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", *argv], capture_output=True, text=True,
                              cwd=REPO, timeout=SHOW_TIMEOUT_S + 300, check=False)
        assert shot.returncode == 0, shot.stderr[-3000:] + d.log.read_text()[-3000:]
        result = json.loads(shot.stdout.strip().splitlines()[-1])
        assert result["seen"], f"the viewer did not show the page's GREEN: {result}"
        assert result["thumb_seen"], f"the row's thumbnail did not show the page's GREEN: {result}"
        assert result["emptied"], result
        # The row said what the start was doing: at least three different steps of a real start (a restore).
        steps = {t.split(" (step")[0] for t in result["progress"] if "(step " in t}
        assert len(steps) >= 3, result["progress"]
        assert "Ended by you." in result["ended_row"], result
        assert result["receipt"] == "Clean: nothing of the session is left.", result
        deadline = time.monotonic() + 120
        while state_listing(w) != before:  # "End session" answers at once; teardown follows
            assert time.monotonic() < deadline, state_listing(w)
            time.sleep(0.5)
    finally:
        stop_dispod(d)
    assert state_listing(w) == before
