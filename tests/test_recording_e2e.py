"""A recorded Chromium session on a real guest (TCG here): the video plays (ffprobe: duration and frame size),
a frame shows the test page's colour (served from the test's "internet" namespace), its sha256 is in the
disposal receipt, and the session leaves nothing else behind (issue 22)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from dispo.infra.rfbclient import RfbClient, RfbError
from tests.guests import (
    ARTIFACTS,
    GREEN,
    PAGE_URL,
    SHOW_TIMEOUT_S,
    GuestImages,
    listing,
    session_id,
    spawn_run,
    viewer_url,
)
from tests.netns import NetWorld

WIDTH, HEIGHT = 1280, 800  # the guest's display (runtime/app.py DEFAULT_GEOMETRY)


def _close(rgb: bytes | tuple[int, ...], hexcolour: str, tolerance: int = 24) -> bool:
    want = [int(hexcolour[i:i + 2], 16) for i in (0, 2, 4)]
    return all(abs(a - b) <= tolerance for a, b in zip(rgb[:3], want, strict=True))


# Points of the page area, below the guest browser's toolbar (as tests/viewer_shot.py looks).
POINTS = [(640, 500), (400, 600), (880, 600), (640, 700)]


def _at(frame: bytes, width: int, x: int, y: int, bpp: int) -> bytes:
    at = (y * width + x) * bpp
    return frame[at:at + 3]


def _wait_shown(sock: Path, colour: str, log: Path) -> None:
    """Until the display shows `colour` at POINTS: read through the same RFB client the recorder uses. On
    failure the last screen is left in artifacts/ for a person to look at."""
    deadline = time.monotonic() + SHOW_TIMEOUT_S
    last, size = b"", (0, 0)
    while time.monotonic() < deadline:
        try:
            with RfbClient.connect(sock) as c:
                size = c.size
                last = c.next_frame(incremental=False)
                if all(_close(_at(last, size[0], x, y, 4), colour) for x, y in POINTS):
                    return
        except (RfbError, OSError):
            pass
        time.sleep(2)
    if last:
        ARTIFACTS.mkdir(exist_ok=True)
        rgb = b"".join(last[i:i + 3] for i in range(0, len(last), 4))
        (ARTIFACTS / "recording-e2e-last-screen.ppm").write_bytes(b"P6 %d %d 255\n" % size + rgb)
    seen = [_at(last, size[0], x, y, 4).hex() for x, y in POINTS] if last else []
    raise AssertionError(f"the page never showed {colour} (saw {seen}): {log.read_text()}")


def _shows(video: Path, colour: str) -> int:
    """How many of the video's frames (decoded by ffmpeg) show `colour` at POINTS."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True, timeout=120).stdout
    size = WIDTH * HEIGHT * 3
    frames = [raw[i:i + size] for i in range(0, len(raw) - size + 1, size)]
    return sum(all(_close(_at(f, WIDTH, x, y, 3), colour) for x, y in POINTS) for f in frames)


def test_recorded_browser_session(browser_world: NetWorld, guest_images: GuestImages, chromium_template: str,
                                  tmp_path: Path) -> None:
    """A clone of the chromium template (built once per run): the recording, not the boot, is the subject, and
    the record step follows the app step of a restore as of a boot (the fakes test both)."""
    w = browser_world
    guest_images.give_template(w, chromium_template)
    before = listing(w)
    log = tmp_path / "run.log"
    proc = spawn_run(w, "chromium", f"{PAGE_URL}?check", "--record", log=log)
    try:
        viewer_url(proc, log)
        sid = session_id(w, proc, log)
        _wait_shown(w.state_dir / "sessions" / sid / "vnc.sock", GREEN, log)
        time.sleep(3)  # a few more frames of the page
        stop = w.dispo("stop", sid, timeout=180)
        assert stop.returncode == 0, stop.stderr
        proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    video = w.workspace / "recordings" / sid / "display.webm"
    assert video.is_file(), log.read_text()
    assert "restoring from template profile-chromium" in log.read_text()
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=width,height,codec_name", "-of", "json",
         str(video)], capture_output=True, text=True, check=True, timeout=60).stdout)
    (stream,) = probe["streams"]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("vp8", WIDTH, HEIGHT)
    assert float(probe["format"]["duration"]) >= 2.0
    assert _shows(video, GREEN) >= 1, "no frame shows the test page"
    got = w.dispo("receipt", sid, "--json")
    assert got.returncode == 0, got.stderr
    receipt = json.loads(got.stdout)
    assert receipt["clean"], receipt["leftovers"]
    assert receipt["recording"]["sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
    assert listing(w) == before  # the recording is kept in the workspace, and nothing else
