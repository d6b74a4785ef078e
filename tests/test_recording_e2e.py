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
from tests.guests import GREEN, PAGE_URL, SHOW_TIMEOUT_S, listing, session_id, spawn_run, viewer_url
from tests.netns import NetWorld

WIDTH, HEIGHT = 1280, 800  # the guest's display (runtime/app.py DEFAULT_GEOMETRY)


def _close(rgb: bytes | tuple[int, ...], hexcolour: str, tolerance: int = 24) -> bool:
    want = [int(hexcolour[i:i + 2], 16) for i in (0, 2, 4)]
    return all(abs(a - b) <= tolerance for a, b in zip(rgb[:3], want, strict=True))


def _wait_shown(sock: Path, colour: str, log: Path) -> None:
    """Until the display's centre has `colour`: read through the same RFB client the recorder uses."""
    deadline = time.monotonic() + SHOW_TIMEOUT_S
    last = b""
    while time.monotonic() < deadline:
        try:
            with RfbClient.connect(sock) as c:
                w, h = c.size
                frame = c.next_frame(incremental=False)
                at = ((h // 2) * w + w // 2) * 4
                last = frame[at:at + 3]
                if _close(last, colour):
                    return
        except (RfbError, OSError):
            pass
        time.sleep(2)
    raise AssertionError(f"the page never showed {colour} (centre {last.hex()}): {log.read_text()}")


def _centre_colours(video: Path) -> list[bytes]:
    """The centre pixel of each of the video's frames (decoded by ffmpeg)."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True, timeout=120).stdout
    size = WIDTH * HEIGHT * 3
    at = ((HEIGHT // 2) * WIDTH + WIDTH // 2) * 3
    return [raw[i + at:i + at + 3] for i in range(0, len(raw) - size + 1, size)]


def test_recorded_browser_session(browser_world: NetWorld, tmp_path: Path) -> None:
    w = browser_world
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
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=width,height,codec_name", "-of", "json",
         str(video)], capture_output=True, text=True, check=True, timeout=60).stdout)
    (stream,) = probe["streams"]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("vp8", WIDTH, HEIGHT)
    assert float(probe["format"]["duration"]) >= 2.0
    assert any(_close(c, GREEN) for c in _centre_colours(video)), "no frame shows the test page"
    got = w.dispo("receipt", sid, "--json")
    assert got.returncode == 0, got.stderr
    receipt = json.loads(got.stdout)
    assert receipt["clean"], receipt["leftovers"]
    assert receipt["recording"]["sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
    assert listing(w) == before  # the recording is kept in the workspace, and nothing else
