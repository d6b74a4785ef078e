"""Recordings (issue 22): a recorded session's display becomes a WebM that plays (ffprobe), shows the display's
colour, and whose sha256 is in the disposal receipt; a session without `record` writes nothing; the recorder's
ffmpeg dies with its owner. On fake guests whose display draws one colour (tests/fakes.py VNC_COLOUR)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispo import receipt as dispo_receipt
from dispo.config import Config
from dispo.errors import InvalidInput, NotFound
from dispo.runtime import Runtime, build
from dispo.runtime.live import LiveSession
from dispo.storage import files, recordings
from tests import fakes
from tests.fakeworld import SAFETY_S, cfg, dispod_ready, end_dispod, rt, serving, spawn_dispod

__all__ = ["cfg", "rt"]

COLOUR = "3366cc"


@pytest.fixture
def drawing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fakes, "VNC_COLOUR", COLOUR)
    yield


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "format=duration:stream=width,height,codec_name,nb_read_frames", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True, timeout=SAFETY_S)
    return dict(json.loads(out.stdout))


def middle_pixel(path: Path, width: int, height: int) -> tuple[int, int, int]:
    """The colour at the centre of the video's last frame (decoded by ffmpeg)."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-sseof", "-0.5", "-i", str(path), "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True,
                         timeout=SAFETY_S).stdout
    at = ((height // 2) * width + width // 2) * 3
    return out[at], out[at + 1], out[at + 2]


def close_to(rgb: tuple[int, int, int], hexcolour: str, tolerance: int = 12) -> bool:
    want = [int(hexcolour[i:i + 2], 16) for i in (0, 2, 4)]
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, want, strict=True))


def run_web(rt: Runtime, *, record: bool, seconds: float = 2.5) -> LiveSession:
    live = rt.start(build(rt.cfg, profile="chromium", record=record))
    deadline = time.monotonic() + SAFETY_S
    while live.state.value != "running":
        assert not live.ended, (live.error, live.end_reason)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(seconds)  # a few frames' worth of the display (the video's length is what is asserted)
    live.stop("test over")
    assert live.wait(SAFETY_S)
    return live


def recorder_pids(cfg: Config) -> list[int]:
    """This world's recorder ffmpegs (they write under its workspace)."""
    out = subprocess.run(["pgrep", "-f", f"{cfg.workspace}/recordings/"], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.usefixtures("drawing")
def test_recorded_session_plays_shows_the_display_and_is_in_the_receipt(rt: Runtime) -> None:
    live = run_web(rt, record=True)
    assert live.error is None, live.error
    rec = live.recording
    assert rec is not None and rec.video.is_file()
    probe = ffprobe(rec.video)
    (stream,) = probe["streams"]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("vp8", 64, 48)
    assert float(probe["format"]["duration"]) >= 1.0 and int(stream["nb_read_frames"]) >= 2
    assert close_to(middle_pixel(rec.video, 64, 48), COLOUR)
    # The receipt proves what was kept: the file's sha256, and nothing left over (ffmpeg, the partial file).
    assert live.receipt is not None and live.receipt.clean, live.receipt
    assert live.receipt.recording is not None
    assert live.receipt.recording["sha256"] == files.sha256_file(rec.video)
    assert any(rec.sha256 in k for k in live.receipt.kept)
    assert any("recorder-ffmpeg" in o for o in live.receipt.objects)
    assert recorder_pids(rt.cfg) == []
    # Listed, found, removed.
    assert [r.session_id for r in recordings.list_recordings(rt.cfg)] == [live.id]
    assert recordings.find(rt.cfg, live.id).sha256 == rec.sha256
    recordings.remove(rt.cfg, live.id)
    assert recordings.list_recordings(rt.cfg) == []
    with pytest.raises(NotFound):
        recordings.find(rt.cfg, live.id)


@pytest.mark.usefixtures("drawing")
def test_session_without_record_writes_nothing(rt: Runtime) -> None:
    live = run_web(rt, record=False, seconds=0.5)
    assert live.error is None and live.recording is None
    assert not recordings.recordings_dir(rt.cfg).exists()
    assert live.receipt is not None and live.receipt.recording is None and live.receipt.kept == []
    assert "record" not in live.steps.names


def test_record_needs_a_web_display(cfg: Config) -> None:
    with pytest.raises(InvalidInput, match="web display"):
        build(cfg, image="minimal", command=["true"], record=True)


def test_old_recordings_are_swept(cfg: Config) -> None:
    d = recordings.recordings_dir(cfg) / "0123abcd"
    d.mkdir(parents=True)
    (d / recordings.VIDEO).write_bytes(b"x")
    (d / recordings.INFO).write_text(json.dumps({"bytes": 1, "sha256": "0" * 64, "created": 1000.0}))
    assert recordings.sweep(cfg, now=1000.0 + 3600) == []
    assert recordings.sweep(cfg, now=1000.0 + cfg.recordings.max_age_h * 3600 + 1) == ["0123abcd"]
    assert not d.exists()


def test_api_serves_the_recording_once_ended(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fakes, "VNC_COLOUR", COLOUR)
    with serving(cfg) as svc, svc.raw_uds() as http:
        r = http.post("/v1/sessions", json={"profile": "chromium", "record": True})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        deadline = time.monotonic() + SAFETY_S
        while http.get(f"/v1/sessions/{sid}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        early = http.get(f"/v1/sessions/{sid}/recording")
        assert early.status_code == 404 and "hint" in early.json()
        time.sleep(1.5)
        assert http.delete(f"/v1/sessions/{sid}").status_code in (200, 202, 204)
        while http.get(f"/v1/sessions/{sid}").json()["state"] != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        got = http.get(f"/v1/sessions/{sid}/recording")
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == "video/webm"
        receipt = dispo_receipt.find(cfg, sid)
        assert receipt is not None and receipt["clean"]
        assert hashlib.sha256(got.content).hexdigest() == receipt["recording"]["sha256"]
        with svc.tcp(auth=False) as anonymous:
            assert anonymous.get(f"/v1/sessions/{sid}/recording").status_code == 401


def test_ffmpeg_dies_with_a_killed_dispod(tmp_path: Path) -> None:
    cfg = fakes.config(tmp_path)
    log = tmp_path / "dispod.log"
    proc = spawn_dispod(tmp_path, log)
    try:
        client = dispod_ready(cfg, proc, log)
        created = client.create_session({"profile": "chromium", "record": True})
        deadline = time.monotonic() + SAFETY_S
        while not recorder_pids(cfg):
            assert time.monotonic() < deadline, log.read_text()
            assert client.session(created["id"])["state"] in ("starting", "running"), log.read_text()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(SAFETY_S)
        while recorder_pids(cfg):
            assert time.monotonic() < deadline, "the recorder's ffmpeg outlived its dispod"
            time.sleep(0.05)
        # The next owner reclaims the session from its journal: the half-made recording goes with it.
        gc = subprocess.run([sys.executable, "-m", "dispo", "gc"], env=fakes.env(tmp_path), capture_output=True,
                            text=True, check=False, timeout=SAFETY_S)
        assert gc.returncode == 0, gc.stdout + gc.stderr
        assert list(recordings.recordings_dir(cfg).iterdir()) == []
    finally:
        end_dispod(proc)


def test_cli_lists_and_removes_recordings(cfg: Config, tmp_path: Path) -> None:
    d = recordings.recordings_dir(cfg) / "0123abcd"
    d.mkdir(parents=True)
    (d / recordings.VIDEO).write_bytes(b"x")
    (d / recordings.INFO).write_text(json.dumps({"bytes": 1, "sha256": "ab" * 32, "created": time.time()}))

    def dispo(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dispo", *argv], env=fakes.env(tmp_path), capture_output=True,
                              text=True, check=False, timeout=SAFETY_S)

    listed = json.loads(dispo("recording", "ls", "--json").stdout)["recordings"]
    assert [(r["session_id"], r["sha256"]) for r in listed] == [("0123abcd", "ab" * 32)]
    assert dispo("recording", "rm", "0123abcd").returncode == 0
    assert not d.exists()
    missing = dispo("recording", "rm", "0123abcd")
    assert missing.returncode != 0 and "no recording" in missing.stderr


@pytest.mark.usefixtures("drawing")
def test_a_pooled_guest_records_only_once_claimed(rt: Runtime, cfg: Config) -> None:
    from dispo.runtime.pool import Pool
    from tests.fakeworld import make_template

    make_template(rt, "chromium")
    rt.pool = pool = Pool(rt, budget_mib=4096)
    try:
        pool.fill("chromium", 1)
        deadline = time.monotonic() + SAFETY_S
        while not (waiting := [s for s in rt.sessions(pooled=True) if s.state.value == "starting"
                               and s.step == "pool.hold"]):
            assert time.monotonic() < deadline, "the pool did not fill"
            time.sleep(0.05)
        assert not recordings.recordings_dir(cfg).exists()  # a waiting guest records nothing
        events: list[Any] = []
        live = rt.start(build(cfg, profile="chromium", record=True), sink=events.append)
        assert live is waiting[0] and live.status()["start"] == "pool"
        while live.state.value != "running":
            assert time.monotonic() < deadline and not live.ended, live.error
            time.sleep(0.05)
        time.sleep(1.5)
        live.stop("test over")
        assert live.wait(SAFETY_S) and live.error is None, live.error
        messages = [e.message for e in events]
        ready = next(i for i, m in enumerate(messages) if "from the warm pool" in m)
        started = next(i for i, m in enumerate(messages) if m.startswith("recording the display"))
        assert ready < started  # the recorder started after the guest was handed to this request
        assert live.recording is not None and live.receipt is not None
        assert live.receipt.recording is not None and live.receipt.recording["sha256"] == live.recording.sha256
    finally:
        pool.close()


def test_the_request_log_is_kept_beside_the_video(cfg: Config) -> None:
    from dispo.infra.txn import transaction

    requests = [{"kind": "dns", "name": "example.org", "count": 1}]
    with transaction(cfg, purpose="session", session_id="0123abcd") as tx:
        tmp = recordings.begin(tx)
        (tmp / recordings.VIDEO).write_bytes(b"not really a video")
        rec = recordings.commit(tx, tmp, requests)
    # The unwind removed nothing of it: it was handed over.
    assert rec.video.read_bytes() == b"not really a video" and not tmp.exists()
    log = rec.path / recordings.REQUESTS
    assert json.loads(log.read_text()) == requests
    assert rec.requests_sha256 == files.sha256_file(log)
    assert recordings.find(cfg, "0123abcd") == rec
