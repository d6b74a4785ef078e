"""Recording a session's display: `"record": true` (dispo run --record).

    BOOT (or a restore, or a pooled guest's steps) ... -> app -> record

The `record` step comes right after the app's display is up, so nothing is recorded before the session's own
start (a pooled guest's display, from before it was claimed, never is). It reads the display the viewer uses
(the session's vnc.sock, through infra/rfbclient.py, as one more shared RFB client: watch-only, it sends no
input) and feeds its frames at a fixed rate, FPS a second, to one journaled ffmpeg that encodes VP8 into WebM
(cheap on a host whose cores run TCG guests). The file is written under a temporary name the journal records
(storage/recordings.py); when the session ends, before anything else of it is undone, the recorder stops,
ffmpeg finishes the file, and the recording (with the request log beside it, with log_requests) is renamed
into place and handed over: kept on purpose, its sha256 in the disposal receipt. ffmpeg dies with its owner
(the journaled spawn ties it to the session's thread), and a partial file is removed with the session.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

from dispo.errors import DisplayError, SpawnFailed
from dispo.infra import processes
from dispo.infra.rfbclient import RfbClient, RfbError, RfbIdle
from dispo.profiles import DisplayMode
from dispo.runtime.app import VNC_SOCKET
from dispo.runtime.events import EventKind
from dispo.runtime.steps import Bringup, Step, Steps
from dispo.storage import recordings
from dispo.storage.recordings import Recording

FPS = 2                # frames a second: a browser's page, watched later; cheap to encode beside TCG guests
MAX_CATCH_UP = 10 * FPS  # frames written at once to catch up after a stall (the video keeps wall-clock time)
FFMPEG = "ffmpeg"
FINISH_TIMEOUT_S = 60.0  # ffmpeg's time to write the rest of the file once its input ends
LOG = "ffmpeg.log"


def ffmpeg_argv(out: Path, width: int, height: int, fps: int = FPS) -> list[str]:
    """Raw RGBx frames on stdin -> VP8 in WebM, at the speed libvpx's realtime mode gives, on one thread."""
    return [FFMPEG, "-hide_banner", "-nostats", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb0", "-video_size", f"{width}x{height}", "-framerate", str(fps),
            "-i", "pipe:0", "-an", "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-threads", "1",
            "-b:v", "1M", "-pix_fmt", "yuv420p", "-f", "webm", str(out)]


class Recorder:
    """One session's recording: an RFB client on its display, a thread, and ffmpeg."""

    def __init__(self, b: Bringup, client: RfbClient, tmp: Path, fps: int = FPS) -> None:
        self._b = b
        self._client = client
        self._tmp = tmp
        self._fps = fps
        self.size = client.size
        self._stop = threading.Event()
        self.problem = ""  # why it stopped early, if it did
        self.frames = 0
        log = open(b.tx.state_path / LOG, "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            spawned = processes.spawn_recorded(b.tx.journal, ffmpeg_argv(tmp / recordings.VIDEO, *self.size, fps),
                                               what="recorder-ffmpeg", stdout=log, stdin_pipe=True,
                                               term_timeout="10")
        except (SpawnFailed, OSError) as e:
            raise DisplayError(f"the recorder (ffmpeg) did not start: {e}",
                               hint="install ffmpeg (apt-get install ffmpeg)") from None
        finally:
            log.close()
        self._proc, self._start = spawned.proc, spawned.starttime
        self._thread = threading.Thread(target=self._feed, name=f"dispo-record-{b.tx.session_id}", daemon=True)
        self._thread.start()

    def _fit(self, frame: bytes) -> bytes:
        """A frame of the recording's size (a display resized meanwhile is cropped or padded with black)."""
        (w, h), (fw, fh) = self.size, self._client.size
        if (fw, fh) == (w, h):
            return frame
        rows = [frame[y * fw * 4:(y * fw + min(w, fw)) * 4].ljust(w * 4, b"\0") for y in range(min(h, fh))]
        return b"".join(rows).ljust(w * h * 4, b"\0")

    def _feed(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        period = 1.0 / self._fps
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                next_at = start + self.frames * period
                with contextlib.suppress(RfbIdle):  # the screen did not change: the last frame again
                    self._client.next_frame(wait=max(0.05, next_at - time.monotonic()))
                if self._stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                # Every frame due by now, so the video keeps the session's time however late this thread ran.
                due = int((time.monotonic() - start) / period) + 1
                frame = self._fit(self._client.frame())
                n = min(max(1, due - self.frames), MAX_CATCH_UP)
                for _ in range(n):
                    stdin.write(frame)
                self.frames += n
        except RfbError as e:
            if not self._stop.is_set():
                self.problem = f"the display stopped answering: {e}"
        except OSError as e:
            self.problem = f"ffmpeg stopped taking frames: {e.strerror or e}"
        finally:
            with contextlib.suppress(OSError):
                stdin.close()  # ffmpeg's end of input: it finishes the file

    def finish(self) -> Recording | None:
        """Stop, let ffmpeg finish the file, and keep it: the recording, or None (a notice says why)."""
        self._stop.set()
        self._client.interrupt()
        self._thread.join(30)
        self._client.close()
        try:
            rc = self._proc.wait(FINISH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            processes.terminate(self._proc.pid, self._start, term_timeout=3)
            rc = None
        b = self._b
        video = self._tmp / recordings.VIDEO
        if rc != 0 or not video.is_file() or not self.frames:
            why = self.problem or (f"ffmpeg exited with status {rc}" if rc else "no frame was recorded")
            b.emit(EventKind.NOTICE, f"no recording kept: {why}")
            return None  # the partial file goes with the session (its journal entry)
        log = b.request_log
        rec = recordings.commit(b.tx, self._tmp, log.requests() if log is not None else None)
        b.kept.append(rec.describe())
        b.recording = rec
        b.emit(EventKind.NOTICE, f"recording kept: {rec.video} ({self.frames} frames, sha256 {rec.sha256})"
                                 + (f"; it stopped early: {self.problem}" if self.problem else ""),
               recording=rec.to_json())
        return rec


def record(b: Bringup) -> None:
    """Start recording the app's web display (when the request asks for it: a pooled guest's steps always
    carry this step, and learn the request only when claimed)."""
    if not b.request.record or b.request.display is not DisplayMode.WEB:
        return
    recordings.sweep(b.cfg)  # recordings past their age go before a new one is made
    sock = b.tx.state_path / VNC_SOCKET
    tmp = recordings.begin(b.tx)
    try:
        client = RfbClient.connect(sock)
    except (RfbError, OSError) as e:
        raise DisplayError(f"the recorder could not read the display: {e}",
                           hint="the app's display closed as the session started; see the app's messages") from None
    try:
        recorder = Recorder(b, client, tmp)
    except BaseException:
        client.close()
        raise
    b.tx.stack.callback(recorder.finish)  # first on unwind: the display and the app are still there
    w, h = recorder.size
    b.emit(EventKind.NOTICE, f"recording the display ({w}x{h}, {FPS} frames a second)", width=w, height=h, fps=FPS)


STEP = Step("record", record)


def with_recording(steps: Steps) -> Steps:
    """The step list with the recorder after the app's display (unchanged without an app step or with one)."""
    if "app" not in steps.names or STEP.name in steps.names:
        return steps
    return steps.insert_after("app", STEP)


__all__ = ["FPS", "Recorder", "ffmpeg_argv", "record", "with_recording"]
