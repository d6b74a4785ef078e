"""The disposable browser end to end: `dispo run chromium` on a real guest (QEMU, TCG here), its page
served from the test's "internet" netns, seen on the host through the web viewer (Playwright + Debian's
chromium) and through X11 forwarding onto an Xvfb the test starts (there from an image made with
`dispo image build chromium --from minimal`).

The page paints the screen RED when it finds the localStorage value or cookie that `page.html?set` stores,
GREEN otherwise: session 1 opens ?set and must end up RED (storage works within a session); session 2
opens ?check and must be GREEN (nothing of session 1's browser profile survived). The web viewer's two sessions
are clones restored from the chromium profile's template (one boot for both). After every session an
independent listing of host objects must equal the one taken before.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dispo import profiles
from tests.guests import (
    ARTIFACTS,
    GREEN,
    PAGE_URL,
    RED,
    SHOW_TIMEOUT_S,
    GuestImages,
    listing,
    session_id,
    shot,
    spawn_run,
    viewer_url,
)
from tests.netns import DISPO, NetWorld, in_ns

pytestmark = [pytest.mark.root, pytest.mark.vm]


def _status(w: NetWorld, url: str) -> str:
    return in_ns(w.host, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url,
                 check=False).stdout


def _probe(address: str, port: int) -> list[str]:
    # bash's /dev/tcp: what the other side says first ("RFB 003.008" from a VNC server), or nothing.
    return ["timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port} && head -c 4 <&3"]


def _guest_address(w: NetWorld, sid: str) -> str:
    return str(json.loads((w.state_dir / "sessions" / sid / "ssh.json").read_text())["address"])


def test_web_viewer_two_sessions_restored_from_the_chromium_template(browser_world: NetWorld,
                                                                     guest_images: GuestImages,
                                                                     chromium_template: str,
                                                                     tmp_path: Path) -> None:
    """Two sessions, each a clone restored from the chromium profile's template (tests/guests.py builds it once
    per run: one boot, then a save; it holds the browser running on a blank page, and a clone is handed the
    session's URL), each shown in its own viewer. The guest is not the subject here, the viewer and the clones'
    separation are: a cold boot of a browser session shown in the viewer is test_browser_features's and
    test_quiet's."""
    w = browser_world
    guest_images.give(w, "minimal")
    guest_images.give_template(w, chromium_template)
    before = listing(w)

    # Session 1: storage works within a clone (RED), the token guards the viewer, VNC stays in the guest.
    log1 = tmp_path / "run1.log"
    one = spawn_run(w, "chromium", "--display", "web", f"{PAGE_URL}?set", log=log1)
    url = viewer_url(one, log1)
    sid = session_id(w, one, log1)
    address = _guest_address(w, sid)
    seen = shot(w, url, "browser-web-session1.png", RED)
    assert seen["seen"], f"session 1 did not show RED through the viewer: {seen}"

    base = url.rsplit("/", 2)[0]  # http://127.0.0.1:PORT
    assert _status(w, url) == "200"
    assert _status(w, base + "/") == "403"
    assert _status(w, base + "/not-the-token/") == "403"

    # The profile's shm_mib reached the guest: /dev/shm is sized by dispo.shm, not the tmpfs default.
    shm = w.dispo("ssh", sid, "--", "df", "-m", "--output=size", "/dev/shm", timeout=60)
    assert shm.stdout.split()[-1] == str(profiles.find("chromium").shm_mib), shm.stdout + shm.stderr

    in_guest = w.dispo("ssh", sid, "--", *_probe("127.0.0.1", 5900), timeout=60)
    assert in_guest.stdout == "RFB ", in_guest.stderr  # the probe works: the guest's own loopback has VNC
    on_tap = w.dispo("ssh", sid, "--", *_probe(address, 5900), timeout=60)
    assert on_tap.stdout == "", "VNC answers on the guest's network address"
    other = w.dispo("run", "--image", "minimal", "--", *_probe(address, 5900), timeout=300)
    assert other.stdout == "" and other.returncode != 0, "another session's guest reached the VNC port"
    assert "ready in" in other.stderr, other.stderr  # it really ran in a second guest

    # The viewer's End-session button ends the session and tears it all down.
    ended = shot(w, url, "browser-web-session1-end.png", RED, end=True)
    assert ended.get("ended"), ended
    assert one.wait(120) == 0, log1.read_text()
    assert "restoring from template profile-chromium" in log1.read_text(), log1.read_text()
    assert listing(w) == before
    assert _status(w, url) == "000"  # the viewer is gone with the session

    # Session 2, restored from the same template: nothing of session 1's browser profile is in it (GREEN);
    # closing the browser ends it.
    log2 = tmp_path / "run2.log"
    two = spawn_run(w, "chromium", f"{PAGE_URL}?check", log=log2)  # the profile's display: web
    url2 = viewer_url(two, log2)
    sid2 = session_id(w, two, log2)
    fresh = shot(w, url2, "browser-web-session2.png", GREEN)
    assert fresh["seen"], f"session 2 did not show GREEN (a fresh profile): {fresh}"
    w.dispo("ssh", sid2, "--", "pkill", "-TERM", "-x", "chromium", timeout=60)
    two.wait(120)
    assert "chromium exited with status" in log2.read_text(), log2.read_text()
    assert "restoring from template profile-chromium" in log2.read_text(), log2.read_text()
    assert listing(w) == before


def _free_display() -> int:
    for n in range(60, 99):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display")


def _chromium_window(display: str) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) of the largest visible chromium window on display, or None."""
    found = subprocess.run(["xdotool", "search", "--onlyvisible", "--class", "chromium"], capture_output=True,
                           text=True, env=dict(os.environ, DISPLAY=display), check=False, timeout=10).stdout.split()
    best: tuple[int, int, int, int] | None = None
    for wid in found:
        info = subprocess.run(["xwininfo", "-display", display, "-id", wid], capture_output=True, text=True,
                              check=False, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines()) if v}
        try:
            geo = (int(fields["Absolute upper-left X"]), int(fields["Absolute upper-left Y"]),
                   int(fields["Width"]), int(fields["Height"]))
        except (KeyError, ValueError):
            continue
        if best is None or geo[2] * geo[3] > best[2] * best[3]:
            best = geo
    return best


def test_x11_forwarding_to_host_display(browser_world: NetWorld, guest_images: GuestImages, tmp_path: Path) -> None:
    for tool in ("Xvfb", "xwininfo", "xdotool", "import", "xauth"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian: xvfb, x11-utils, xdotool, imagemagick, xauth)")
    from tests.viewer_shot import close, pixel

    w = browser_world
    # The browser installed into the minimal image (`--from`, as the seed does by hand inside a VM): this
    # test also proves such an image boots and shows the browser.
    guest_images.give(w, "minimal")
    p = subprocess.run([*DISPO, "image", "build", "chromium", "--from", "minimal", "--name", "minimal-chromium",
                        "--quiet"], env=w.env(), capture_output=True, text=True, timeout=1800, check=False,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    n = _free_display()
    display = f":{n}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not Path(f"/tmp/.X11-unix/X{n}").exists():
            assert xvfb.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.1)
        before = listing(w)
        env = dict(w.env(), DISPLAY=display, XAUTHORITY=str(tmp_path / "Xauthority"))
        log = tmp_path / "run.log"
        proc = spawn_run(w, "chromium", "--image", "minimal-chromium", "--display", "x11", f"{PAGE_URL}?check",
                          log=log, env=env)
        deadline = time.monotonic() + 240 + SHOW_TIMEOUT_S
        shot = ARTIFACTS / "browser-x11.png"
        ARTIFACTS.mkdir(exist_ok=True)
        rgb: tuple[int, ...] = ()
        geo = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"dispo run exited {proc.returncode}: {log.read_text()}"
            geo = _chromium_window(display)
            if geo is not None and geo[2] > 200 and geo[3] > 200:
                subprocess.run(["import", "-display", display, "-window", "root", str(shot)], check=True, timeout=30)
                x, y, width, height = geo
                rgb = pixel(shot, x + width // 2, y + height * 3 // 4)  # below the browser's own toolbar
                if close(rgb, tuple(int(GREEN[i:i + 2], 16) for i in (0, 2, 4))):
                    break
            time.sleep(2)
        tree = subprocess.run(["xwininfo", "-display", display, "-root", "-tree"], capture_output=True, text=True,
                              check=True, timeout=10).stdout
        assert "dispo-test-page" in tree or "chromium" in tree.lower(), tree
        assert geo is not None, f"no chromium window on the host display: {tree}"
        assert close(rgb, tuple(int(GREEN[i:i + 2], 16) for i in (0, 2, 4))), f"window centre {rgb}, expected GREEN"
        # The window says it is a disposable session's: "[dispo ID] " before its title.
        sid = session_id(w, proc, log)
        titles: list[str] = []
        for _ in range(30):
            wids = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "."], capture_output=True,
                                  text=True, env=dict(os.environ, DISPLAY=display), check=False, timeout=10).stdout
            titles = [subprocess.run(["xdotool", "getwindowname", wid], capture_output=True, text=True, check=False,
                                     env=dict(os.environ, DISPLAY=display), timeout=10).stdout.strip()
                      for wid in wids.split()]
            if any(t.startswith(f"[dispo {sid}] ") and "dispo-test-page" in t for t in titles):
                break
            time.sleep(1)
        assert any(t.startswith(f"[dispo {sid}] ") and "dispo-test-page" in t for t in titles), titles
        os.kill(proc.pid, signal.SIGTERM)  # nsenter exec()s dispo: this is dispo itself
        assert proc.wait(120) == 128 + signal.SIGTERM, log.read_text()
        assert listing(w) == before
    finally:
        xvfb.terminate()
        xvfb.wait(10)


def test_profile_input_errors(browser_world: NetWorld) -> None:
    w = browser_world
    before = listing(w)
    cases: tuple[tuple[tuple[str, ...], str], ...] = (
        (("chromium", "http://a/", "http://b/"), "one URL at most"),
        (("no-such-profile",), "no profile named"),
        (("chromium", "--bogus"), "unknown option"),
        (("--display", "web", "--", "true"), "goes with a profile"))
    for args, text in cases:
        p = w.dispo("run", *args)
        assert p.returncode == 1 and text in p.stderr and len(p.stderr.splitlines()) == 1, (args, p.stderr)
    cases = ((("chromium", "--from", "no-such-image"), "no-such-image"),
             (("chromium", "--from", "chromium", "--name", "chromium"), "cannot replace its source"))
    for args, text in cases:
        p = w.dispo("image", "build", *args)
        assert p.returncode == 1 and text in p.stderr and len(p.stderr.splitlines()) == 1, (args, p.stderr)
    env = {k: v for k, v in w.env().items() if k != "DISPLAY"}
    p = subprocess.run(w.dispo_argv("run", "chromium", "--display", "x11"), capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert p.returncode == 1 and "$DISPLAY is not set" in p.stderr, p.stderr
    assert listing(w) == before
