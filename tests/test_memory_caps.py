"""Issue 20: a guest or a client cannot exhaust dispod's memory (or the host's, through the state dir or
`--downloads DIR`).

dispod runs on the fake machinery: as a process where its memory is measured (VmHWM from /proc, so the test's
own memory is not counted), in a thread of this process elsewhere. The hostile guest is named as a fake:
tests/fakes.py's HOSTILE_FILES answers a listing with 1.5 GiB and swallows uploads; chatty_app_machinery's
display app prints 256 MiB. Nothing here asserts a duration.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from dispo import config as config_mod
from dispo import guest
from dispo.client import DispodClient
from dispo.config import Config
from dispo.features import Features
from dispo.runtime import app, guestio, saver
from dispo.runtime.saver import DownloadSaver, open_directory
from dispo.servicepaths import ServicePaths
from tests import fakes
from tests.fakeworld import (
    SAFETY_S,
    cfg,
    serving,
    wait_state,
)

__all__ = ["cfg"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

MIB = 1 << 20
RSS_BUDGET = 64 * MIB
UPLOAD_BYTES = 300 * 1000 * 1000


def _with_service(root: Path, text: str) -> Config:
    """The test's config with a [service] table added (a short body deadline)."""
    path = fakes.config_file(root)
    path.write_text(path.read_text() + f"[service]\n{text}\n")
    return config_mod.load(path, env={})


# -- dispod as a process, its memory read from /proc ------------------------------------------------------
def _vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@contextlib.contextmanager
def dispod_process(cfg: Config, tmp_path: Path, machinery: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "dispod.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dispo.daemon.main", "--machinery", machinery],
                                env=fakes.env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=fakes.REPO)
    try:
        deadline = time.monotonic() + SAFETY_S
        while (client := DispodClient.available(cfg)) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        client.close()
        yield proc, ServicePaths(cfg.state_dir).socket
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(SAFETY_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _uds(sock: Path) -> httpx.Client:
    return httpx.Client(base_url="http://dispod", transport=httpx.HTTPTransport(uds=str(sock)), timeout=SAFETY_S)


def _running_browser(http: httpx.Client) -> str:
    sid = str(http.post("/v1/sessions", json={"profile": "chromium"}).json()["id"])
    deadline = time.monotonic() + SAFETY_S
    while (state := http.get(f"/v1/sessions/{sid}").json()["state"]) != "running":
        assert state != "ended" and time.monotonic() < deadline, state
        time.sleep(0.05)
    return sid


def test_a_guest_answering_1_5_gib_costs_dispod_little_and_gets_502(cfg: Config, tmp_path: Path) -> None:
    with dispod_process(cfg, tmp_path, "tests.fakes:hostile_machinery") as (proc, sock), _uds(sock) as http:
        sid = _running_browser(http)
        assert http.get(f"/v1/sessions/{sid}").status_code == 200
        before = _vm_kib(proc.pid, "VmHWM") * 1024
        for what in ("downloads", "clipboard", "downloads", "downloads/x.pdf"):
            r = http.get(f"/v1/sessions/{sid}/{what}")
            assert r.status_code == 502, (what, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "answered" in r.json()["detail"] and "more than" in r.json()["detail"], r.json()
        grown = _vm_kib(proc.pid, "VmHWM") * 1024 - before
        assert grown < RSS_BUDGET, f"dispod's peak RSS grew by {grown // MIB} MiB"
        assert http.get(f"/v1/sessions/{sid}").json()["state"] == "running"  # the session goes on


def _zeros(total: int) -> Iterator[bytes]:
    block = bytes(1 << 16)
    left = total
    while left:
        yield block[:min(left, len(block))]
        left -= min(left, len(block))


def test_three_parallel_300_mb_uploads_cost_dispod_little(cfg: Config, tmp_path: Path) -> None:
    with dispod_process(cfg, tmp_path, "tests.fakes:hostile_machinery") as (proc, sock), _uds(sock) as http:
        sid = _running_browser(http)
        before = _vm_kib(proc.pid, "VmHWM") * 1024

        def upload(n: int) -> httpx.Response:
            with _uds(sock) as mine:
                return mine.post(f"/v1/sessions/{sid}/uploads", params={"name": f"big{n}.bin"},
                                 content=_zeros(UPLOAD_BYTES),
                                 headers={"Content-Length": str(UPLOAD_BYTES),
                                          "Content-Type": "application/octet-stream"})

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(upload, range(3)))
        assert [r.status_code for r in answers] == [201] * 3, [r.text[:300] for r in answers]
        assert sorted(r.json()["name"] for r in answers) == ["big0.bin", "big1.bin", "big2.bin"]
        assert all(r.json()["size"] == UPLOAD_BYTES for r in answers)
        grown = _vm_kib(proc.pid, "VmHWM") * 1024 - before
        assert grown < RSS_BUDGET, f"dispod's peak RSS grew by {grown // MIB} MiB"


# -- request bodies: deadline, uploads in flight, a body in several writes ---------------------------------
@pytest.fixture
def tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's files.sh, run in the fake guest's directory as its home; the clipboard is a file there."""
    wrapper = tmp_path / "dispo-files"
    files_sh = Path(guest.__file__).parent / "files.sh"
    wrapper.write_text(f'#!/bin/sh\nexport HOME=$PWD\ncase "$1" in\nclip-set) exec cat > clipboard.txt ;;\n'
                       f'clip-get) exec cat clipboard.txt ;;\nesac\nexec sh {files_sh} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(guest, "FILES_PATH", str(wrapper))


def _connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(SAFETY_S)
    s.connect(str(sock))
    return s


def _head(method: str, path: str, length: int, content_type: str = "application/octet-stream") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: dispod\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _answer(s: socket.socket, data: bytes = b"") -> bytes:
    """One HTTP answer (after `data`, its start read already), read up to its Content-Length or the close."""
    with contextlib.suppress(OSError):
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if sep and length and len(body) >= length[0]:
                break
            if not (chunk := s.recv(65536)):
                break
            data += chunk
    return data


def _home(svc: object, sid: str) -> Path:
    live = svc.dispod.service.live(sid)  # type: ignore[attr-defined]
    assert isinstance(live.channel, fakes.FakeChannel)
    return live.channel.home


def test_a_body_that_trickles_is_cut_off_by_its_deadline(cfg: Config, tool: None, tmp_path: Path) -> None:
    cfg = _with_service(tmp_path, "body_timeout_s = 1")
    with serving(cfg) as svc:
        sid = svc.uds.create_session({"profile": "chromium"})["id"]
        wait_state(svc.uds, sid, "running")
        with _connect(svc.dispod.paths.socket) as s:
            s.sendall(_head("POST", f"/v1/sessions/{sid}/uploads?name=slow.bin", 1000) + b"x")
            sent = 1
            s.settimeout(0.3)
            answer = b""
            while not answer and sent < 100:  # a byte at a time, until dispod answers (30 s at most)
                try:
                    answer = s.recv(65536) or b"(closed)"
                except TimeoutError:
                    with contextlib.suppress(OSError):
                        s.sendall(b"x")
                    sent += 1
            s.settimeout(SAFETY_S)
            answer = _answer(s, answer)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"application/problem+json" in answer and b"came too slowly" in answer
        assert sent < 100
        uploads = _home(svc, sid) / "Uploads"
        deadline = time.monotonic() + SAFETY_S
        while uploads.exists() and any(uploads.iterdir()):  # the guest keeps nothing of it
            assert time.monotonic() < deadline, list(uploads.iterdir())
            time.sleep(0.05)
        assert svc.uds.upload(sid, "fast.bin", b"y" * 100_000)["name"] == "fast.bin"  # its slot is free again
        svc.uds.delete(sid, wait=True)


def test_uploads_past_the_cap_in_flight_are_refused_with_a_problem(cfg: Config, tool: None) -> None:
    with serving(cfg) as svc:
        sid = svc.uds.create_session({"profile": "chromium"})["id"]
        other = svc.uds.create_session({"profile": "chromium"})["id"]
        wait_state(svc.uds, sid, "running")
        wait_state(svc.uds, other, "running")
        path = svc.dispod.paths.socket
        hanging = []
        try:
            for n in range(guestio.UPLOADS_PER_SESSION):  # each sends part of its body and waits
                s = _connect(path)
                s.sendall(_head("POST", f"/v1/sessions/{sid}/uploads?name=h{n}", 1 << 20) + b"z" * 1000)
                hanging.append(s)
            deadline = time.monotonic() + SAFETY_S
            while len(list((_home(svc, sid) / "Uploads").glob(".dispo-upload.*"))) < len(hanging):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with svc.raw_uds() as http:
                # The uploads hold no body, so the answer comes although their bodies are not all there.
                r = http.post(f"/v1/sessions/{sid}/uploads", params={"name": "one-more"}, content=b"m" * 10)
                assert r.status_code == 429, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                assert "uploads under way" in r.json()["detail"]
                assert http.post(f"/v1/sessions/{other}/uploads", params={"name": "o"},
                                 content=b"o").status_code == 201  # another session is not affected
                # dispod's own cap: the other uploads it allows are taken here (dispod runs in this process)
                taken = 0
                while guestio._ALL_UPLOADS.acquire(blocking=False):
                    taken += 1
                try:
                    assert taken == guestio.UPLOADS_PER_PROCESS - guestio.UPLOADS_PER_SESSION
                    r = http.post(f"/v1/sessions/{other}/uploads", params={"name": "o2"}, content=b"o")
                    assert r.status_code == 429 and "in all sessions" in r.json()["detail"], r.text
                finally:
                    for _ in range(taken):
                        guestio._ALL_UPLOADS.release()
        finally:
            for s in hanging:
                s.close()
        deadline = time.monotonic() + SAFETY_S
        while True:  # the closed uploads give their slots back, and the guest keeps nothing of them
            try:
                svc.uds.upload(sid, "after.bin", b"a")
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        while sorted(p.name for p in (_home(svc, sid) / "Uploads").iterdir()) != ["after.bin"]:
            assert time.monotonic() < deadline, list((_home(svc, sid) / "Uploads").iterdir())
            time.sleep(0.05)
        svc.uds.delete(sid, wait=True)
        svc.uds.delete(other, wait=True)


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", "first half, " * 3000 + "second half"),
    ("application/json", '{"text": "' + "first half, " * 3000 + 'second half"}'),
])
def test_a_clipboard_body_in_two_writes_is_read_whole(cfg: Config, tool: None, content_type: str,
                                                        body: str) -> None:
    text = "first half, " * 3000 + "second half"
    with serving(cfg) as svc:
        sid = svc.uds.create_session({"profile": "chromium"})["id"]
        wait_state(svc.uds, sid, "running")
        data = body.encode()
        with _connect(svc.dispod.paths.socket) as s:
            s.sendall(_head("PUT", f"/v1/sessions/{sid}/clipboard", len(data), content_type) + data[:1000])
            time.sleep(0.3)  # the two writes arrive apart (the handler has read the first by then)
            s.sendall(data[1000:])
            answer = _answer(s)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert (_home(svc, sid) / "clipboard.txt").read_text() == text
        assert svc.uds.clipboard(sid) == text
        svc.uds.delete(sid, wait=True)


# -- a display app's output in the state dir --------------------------------------------------------------
def test_a_display_apps_output_is_capped_in_app_log(cfg: Config) -> None:
    with serving(cfg, machinery=fakes.chatty_app_machinery()) as svc:
        sid = svc.uds.create_session({"profile": "chromium"})["id"]
        wait_state(svc.uds, sid, "running")  # the app printed its 256 MiB before its display came up
        log = cfg.state_dir / "sessions" / sid / app.APP_LOG
        size = log.stat().st_size
        assert size <= app.LOG_CAP, size
        text = log.read_bytes().decode(errors="replace")
        first = text.splitlines()[0]
        assert first.startswith("[dispo: ") and "bytes of the app's output dropped" in first, first
        dropped = int(first.split()[1])
        assert dropped > fakes.APP_FLOOD_BYTES - app.LOG_CAP
        assert fakes.APP_LAST_LINE in text and "fake app: errors" in text  # the last part is kept
        svc.uds.delete(sid, wait=True)


# -- --downloads DIR ----------------------------------------------------------------------------------------
def test_downloads_dir_stops_at_the_sessions_quota_and_its_record_stays_bounded(tmp_path: Path) -> None:
    policy = Features.from_profile({"downloads": {"total_mib": 1, "total_files": 50}}, where="p.toml")
    assert (policy.downloads_total_mib, policy.downloads_total_files) == (1, 50)
    rounds = [0]

    def listing() -> list[dict[str, object]]:  # a guest whose 1000 files change their sizes at every poll
        rounds[0] += 1
        return [{"name": f"f{i}.bin", "size": 10 + rounds[0], "complete": True} for i in range(1000)]

    @contextlib.contextmanager
    def opener(name: str) -> Iterator[Iterator[bytes]]:
        yield iter([b"d" * (10 + rounds[0])])

    events: list[str] = []
    out = tmp_path / "out"
    out.mkdir()
    s = DownloadSaver(out, open_directory(out), lister=listing, opener=opener, max_bytes=MIB,
                      total_bytes=policy.downloads_total_mib * MIB, total_files=policy.downloads_total_files,
                      on_saved=lambda n, st, size: events.append(f"saved {st}"),
                      on_error=lambda text: events.append(f"error {text}"))
    for _ in range(20):
        s.poll()
    saved = [e for e in events if e.startswith("saved")]
    assert len(saved) == 50 == len(list(out.iterdir()))
    assert s.stopped and "total_files" in s.stopped
    assert [e for e in events if e.startswith("error")] == [f"error {s.stopped}"]  # said once
    assert len(s._done) <= 50  # its record: one entry per name it copied

    # One name that keeps changing is copied at most MAX_COPIES times; bytes stop at total_mib.
    rounds[0] = 0
    events.clear()
    one = tmp_path / "one"
    one.mkdir()

    def one_file() -> list[dict[str, object]]:
        rounds[0] += 1
        return [{"name": "grows.bin", "size": 10 + rounds[0], "complete": True}]

    s = DownloadSaver(one, open_directory(one), lister=one_file, opener=opener, max_bytes=MIB,
                      on_saved=lambda n, st, size: events.append(f"saved {st}"),
                      on_error=lambda text: events.append(f"error {text}"))
    for _ in range(10):
        s.poll()
    assert len([e for e in events if e.startswith("saved")]) == saver.MAX_COPIES
    assert len([e for e in events if "changed again" in e]) == 1

    big = tmp_path / "big"
    big.mkdir()
    events.clear()
    files = {f"b{i}": 400 * 1024 for i in range(10)}

    @contextlib.contextmanager
    def big_opener(name: str) -> Iterator[Iterator[bytes]]:
        yield iter([bytes(files[name])])

    s = DownloadSaver(big, open_directory(big), lister=lambda: [
        {"name": n, "size": size, "complete": True} for n, size in files.items()], opener=big_opener,
        max_bytes=MIB, total_bytes=MIB, on_saved=lambda n, st, size: events.append(f"saved {st}"),
        on_error=lambda text: events.append(f"error {text}"))
    s.poll()
    s.poll()
    assert len(list(big.iterdir())) == 2  # 800 KiB of 1 MiB; a third would pass it
    assert "total_mib" in s.stopped and "--downloads stopped" in s.stopped


def test_a_deeply_nested_clipboard_body_is_400(cfg: Config, tool: None) -> None:
    with serving(cfg) as svc:
        sid = svc.uds.create_session({"profile": "chromium"})["id"]
        wait_state(svc.uds, sid, "running")
        data = b"[" * 30000 + b"]" * 30000
        with _connect(svc.dispod.paths.socket) as s:
            s.sendall(_head("PUT", f"/v1/sessions/{sid}/clipboard", len(data), "application/json") + data)
            answer = _answer(s)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        assert b"application/problem+json" in answer and b"nests deeper" in answer
        svc.uds.delete(sid, wait=True)
