"""Every host process of a session goes through the one journaled spawn (processes.spawn_recorded): also the
guest commands a running session starts on demand, such as a viewer's sound stream. dispod runs as a process
on the fake machinery (tests/fakes.py: SOUND_FILES is the guest's sound), so it can be killed with -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import aiohttp

from dispo.client import DispodClient
from dispo.config import Config
from dispo.features import Features
from dispo.infra import journal, processes
from dispo.infra.journal import Journal
from dispo.names import new_session_id
from dispo.runtime import guestio
from dispo.runtime.live import CancelToken, SessionState
from tests import fakes
from tests.fakeworld import (
    SAFETY_S,
    cfg,
    wait_state,
)

__all__ = ["cfg"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

LOUD = fakes.CHROMIUM_PROFILE + "audio = true\n"


def _journaled(cfg: Config, sid: str, what: str) -> list[dict[str, str]]:
    state = json.loads((journal.sessions_root(cfg.state_dir) / sid / journal.STATE_FILE).read_text())
    return [r["args"] for r in state["resources"] if r["kind"] == "process" and r["args"].get("what") == what]


def _unix(url: str) -> tuple[str, str]:
    """(socket, path) of an http+unix:// URL."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "http+unix", url
    return urllib.parse.unquote(parts.netloc), parts.path


async def _listen_then_kill(cfg: Config, sid: str, viewer_url: str, dispod: subprocess.Popen[bytes]) -> None:
    """Open the session's sound in its viewer; once its process is in the journal and running, SIGKILL dispod;
    then that process must be gone too (within a bound: the kernel delivers the parent-death signal)."""
    sock, path = _unix(viewer_url)  # dispod here listens on its socket only
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http, \
            http.ws_connect(f"http://dispod{path.rstrip('/')}/sound", protocols=("binary",)) as ws:
        msg = await ws.receive(timeout=SAFETY_S)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == fakes.SOUND_BYTES, msg
        deadline = time.monotonic() + SAFETY_S
        while not (entries := _journaled(cfg, sid, "dispo-files sound")):
            assert time.monotonic() < deadline, "the sound stream's process is not in the session's journal"
            await asyncio.sleep(0.05)
        [entry] = entries
        pid, start = int(entry["pid"]), entry["starttime"]
        assert processes.is_same_process(pid, start)
        # The guest command itself, not its gate. Its cmdline reads empty for the instant of an exec (the new
        # image has no arguments yet), so wait for it to settle rather than read it once.
        while b"sleep" not in (cmdline := Path(f"/proc/{pid}/cmdline").read_bytes()):
            assert time.monotonic() < deadline and processes.is_same_process(pid, start), cmdline
            await asyncio.sleep(0.01)
        dispod.send_signal(signal.SIGKILL)
        dispod.wait(SAFETY_S)
        deadline = time.monotonic() + SAFETY_S
        while processes.is_same_process(pid, start):
            assert time.monotonic() < deadline, f"the sound stream's process {pid} outlived dispod"
            await asyncio.sleep(0.05)


def test_a_sound_stream_is_journaled_and_dies_with_a_killed_dispod(cfg: Config, tmp_path: Path) -> None:
    (cfg.profiles_dir / "loud.toml").write_text(LOUD)
    log = tmp_path / "dispod.log"
    with open(log, "ab") as out:
        dispod = subprocess.Popen([sys.executable, "-m", "dispo.daemon.main", "--machinery",
                                   "tests.fakes:sound_machinery"], env=fakes.env(tmp_path), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=fakes.REPO)
    try:
        deadline = time.monotonic() + SAFETY_S
        while (client := DispodClient.available(cfg)) is None:
            assert dispod.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with client:
            sid = client.create_session({"profile": "loud"})["id"]
            viewer_url = wait_state(client, sid, "running")["viewer_url"]
        asyncio.run(_listen_then_kill(cfg, sid, viewer_url, dispod))
        report = journal.gc(cfg.state_dir)  # what the dead dispod left, the sound's entry among it
        assert report.reclaimed == [sid] and not report.failed, report
    finally:
        if dispod.poll() is None:
            os.kill(dispod.pid, signal.SIGKILL)
            dispod.wait(SAFETY_S)


def test_a_guest_commands_process_is_in_the_journal_while_it_runs_and_leaves_it_once_reaped(tmp_path: Path) -> None:
    """An upload holds its guest command (`dispo-files put`) open: its process is journaled, and once it has
    ended and been reaped it is dropped from the journal and from what the receipt checks (a session's many
    short commands do not pile up there)."""
    home = fakes.guest_home(tmp_path / "home")
    journal = Journal.create(tmp_path / "state", new_session_id(), {})
    live = SimpleNamespace(id="1a2b3c4d", channel=fakes.FakeChannel(home, tmp_path / "console.log"), journal=journal,
                           ended=False, cancel=CancelToken(), state=SessionState.RUNNING,
                           request=SimpleNamespace(features=Features()), touch=lambda: None)
    io = guestio.GuestIO(live)
    upload = io.begin_upload("a.txt", 2)
    try:
        [entry] = journal.entries
        assert entry.kind == "process" and entry.args["what"] == "dispo-files put"
        assert processes.is_same_process(int(entry.args["pid"]), entry.args["starttime"])
        upload.write(b"hi")
        assert upload.finish() == "a.txt"
    finally:
        upload.abort()
    assert (home / "Uploads" / "a.txt").read_bytes() == b"hi"
    assert journal.entries == [] and journal.recorded == []
    journal.unwind()
