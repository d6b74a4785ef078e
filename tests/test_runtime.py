"""The session runtime with fake machinery (tests/fakes.py): steps, events, stop reasons, timeouts,
failures and reclaim, in seconds and without root. What each test asserts is observable: events, exit
statuses, the journal directory, the session disk, the fake VMM's process."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dispo import receipt
from dispo.config import Config
from dispo.errors import Busy, Cancelled, GuestFailure, InvalidInput, NetworkError, NotFound
from dispo.net import GuestNetwork
from dispo.runtime import STEPS, EndKind, Event, EventKind, Runtime, SessionState, Step, build
from dispo.runtime.live import LiveSession
from dispo.runtime.steps import Bringup
from dispo.web.viewers import StandaloneViewers
from tests import fakes
from tests.fakeworld import OWNER_SCRIPT, cfg, leftovers, rt

__all__ = ["cfg", "rt"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, e: Event) -> None:
        self.events.append(e)

    def kinds(self, kind: EventKind) -> list[Event]:
        return [e for e in self.events if e.kind is kind]

    def output(self, stream: str) -> bytes:
        return b"".join(base64.b64decode(e.fields["data"]) for e in self.kinds(EventKind.OUTPUT)
                        if e.fields["stream"] == stream)

    def states(self) -> list[str]:
        return [str(e.fields["state"]) for e in self.kinds(EventKind.STATE)]


def run_to_end(rt: Runtime, live: LiveSession, timeout: float = 30) -> LiveSession:
    assert live.wait(timeout), live.status()
    return live


def test_command_session_exit_status_output_and_nothing_left(rt: Runtime, cfg: Config) -> None:
    before = leftovers(cfg)
    rec = Recorder()
    live = rt.start(build(cfg, command=["sh", "-c", "echo out; echo err >&2; exit 7"]), sink=rec)
    run_to_end(rt, live)
    assert live.exit_status == 7 and live.error is None
    assert live.end_reason == "the command exited with status 7" and live.status()["end_kind"] == "exited"
    assert rec.kinds(EventKind.ENDED)[0].fields["end_kind"] == "exited"
    assert rec.output("stdout") == b"out\n" and rec.output("stderr") == b"err\n"
    # Every step ran, in the documented order, and the life went through every state once.
    assert [e.fields["step"] for e in rec.kinds(EventKind.STEP)] == [s.name for s in STEPS]
    assert rec.states() == ["starting", "running", "stopping", "ended"]
    ready = rec.kinds(EventKind.READY)[0]
    assert ready.fields["backend"] == "qemu" and ready.fields["accel"] == "tcg"
    assert rec.kinds(EventKind.ENDED)[0].fields["exit_status"] == 7
    assert leftovers(cfg) == before
    assert rt.get(live.id).state is SessionState.ENDED  # kept for its exit status
    assert rt.sessions() == []


def test_events_round_trip_as_json(rt: Runtime, cfg: Config) -> None:
    rec = Recorder()
    run_to_end(rt, rt.start(build(cfg, command=["true"]), sink=rec))
    for e in rec.events:
        again = Event.from_json(e.to_json())
        assert again == e


def test_stop_while_starting_is_cancelled_with_its_reason(cfg: Config) -> None:
    before = leftovers(cfg)
    rt = Runtime(cfg, machinery=fakes.slow_machinery())
    rec = Recorder()
    live = rt.start(build(cfg, command=["true"]), sink=rec)
    deadline = time.monotonic() + 20
    while not fakes.fake_vmm_pids(live.id):  # the VMM runs; the guest is not ready for 30 s
        assert time.monotonic() < deadline and not live.ended, live.status()
        time.sleep(0.02)
    assert live.state is SessionState.STARTING and live.step == "guest.ready"
    assert live.stop("the user changed their mind")
    assert not live.stop("a second time")  # the first reason stands
    run_to_end(rt, live)
    assert live.end_reason == "the user changed their mind" and live.exit_status is None and live.error is None
    assert live.status()["end_kind"] == "user"  # LiveSession.stop's default: asked by someone
    assert rec.states() == ["starting", "stopping", "ended"]
    assert "app" not in [e.fields["step"] for e in rec.kinds(EventKind.STEP)]
    assert leftovers(cfg) == before


def test_web_display_viewer_then_stop(rt: Runtime, cfg: Config) -> None:
    import httpx

    before = leftovers(cfg)
    rec = Recorder()
    live = rt.start(build(cfg, profile="chromium", url="http://example.test/page"), sink=rec)
    assert live.viewer_url is not None  # served from the start, before the display is up
    deadline = time.monotonic() + 20
    while not rec.kinds(EventKind.VIEWER):
        assert time.monotonic() < deadline and not live.ended, live.status()
        time.sleep(0.02)
    assert live.request.command == ("fake-browser", "http://example.test/page")
    assert httpx.get(live.viewer_url, timeout=5).status_code == 200
    assert rec.kinds(EventKind.VIEWER)[0].fields["url"] == live.viewer_url
    assert (cfg.state_dir / "sessions" / live.id / "viewer.url").read_text().strip() == live.viewer_url
    assert live.status()["end_kind"] is None  # not ended yet
    rt.stop(live.id, "ended from the viewer", EndKind.VIEWER)
    run_to_end(rt, live)
    assert live.end_reason == "ended from the viewer" and live.status()["end_kind"] == "viewer"
    # The session's viewer is closed, but an open page still learns how the session ended ...
    assert httpx.get(live.viewer_url, timeout=5).status_code == 403
    status = httpx.get(live.viewer_url + "status", timeout=5).json()
    assert status["done"] and status["text"] == "The session ended: ended from the viewer."
    assert isinstance(rt.viewers, StandaloneViewers)
    rt.viewers.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(live.viewer_url, timeout=5)  # ... until `dispo run` closes its viewers
    assert leftovers(cfg) == before


def test_idle_timeout_ends_an_unused_session(rt: Runtime, cfg: Config) -> None:
    live = rt.start(build(cfg, command=["sleep", "600"], idle_timeout_s=1))
    run_to_end(rt, live)
    assert live.end_reason.startswith("idle for 1 s") and live.exit_status is None
    assert live.status()["end_kind"] == "idle"


def test_output_counts_as_use(rt: Runtime, cfg: Config) -> None:
    # A command that talks more often than the idle timeout is not idle; it ends by its own exit.
    script = "for i in 1 2 3 4 5 6; do echo tick; sleep 0.3; done; exit 3"
    live = rt.start(build(cfg, command=["sh", "-c", script], idle_timeout_s=1))
    run_to_end(rt, live)
    assert live.exit_status == 3, live.end_reason


def test_max_lifetime_ends_a_busy_session(rt: Runtime, cfg: Config) -> None:
    live = rt.start(build(cfg, command=["sh", "-c", "while :; do echo busy; sleep 0.1; done"], max_lifetime_s=1))
    run_to_end(rt, live)
    assert live.end_reason == "maximum lifetime of 1 s reached" and live.status()["end_kind"] == "lifetime"


def test_guest_death_under_the_command_is_a_failure(rt: Runtime, cfg: Config) -> None:
    before = leftovers(cfg)
    live = rt.start(build(cfg, command=["sleep", "600"]))
    deadline = time.monotonic() + 20
    while live.state is not SessionState.RUNNING:
        assert time.monotonic() < deadline and not live.ended, live.status()
        time.sleep(0.02)
    for pid in fakes.fake_vmm_pids(live.id):
        os.kill(pid, signal.SIGKILL)
    run_to_end(rt, live)
    assert isinstance(live.error, GuestFailure) and "the guest stopped while the command ran" in live.error.message
    assert live.end_reason.startswith("failed: the guest stopped") and live.status()["end_kind"] == "failed"
    assert leftovers(cfg) == before


def test_a_failing_step_undoes_the_steps_before_it(cfg: Config) -> None:
    before = leftovers(cfg)
    fake = fakes.machinery()

    def broken_network(tx: object, policy: object) -> GuestNetwork:
        raise NetworkError("no addresses left in the pool", hint="free a lease")

    import dataclasses

    rt = Runtime(cfg, machinery=dataclasses.replace(fake, attach_network=broken_network))
    live = rt.start(build(cfg, command=["true"]))
    run_to_end(rt, live)
    assert isinstance(live.error, NetworkError) and live.end_reason == "failed: " + live.error.one_line()
    assert leftovers(cfg) == before  # the disk made by the step before is gone


def test_a_step_is_swapped_not_a_second_path(rt: Runtime, cfg: Config) -> None:
    """Restore-instead-of-boot is one step replaced in the list; here a stand-in 'vmm.restore' that
    records it ran and then starts the VMM as the boot step would."""
    ran: list[str] = []
    start = next(s for s in STEPS if s.name == "vmm.start")

    def restore(b: Bringup) -> None:
        ran.append(b.tx.session_id)
        start.run(b)

    steps = STEPS.swap("vmm.start", Step("vmm.restore", restore))
    rec = Recorder()
    live = run_to_end(rt, rt.start(build(cfg, command=["true"]), steps=steps, sink=rec))
    assert live.exit_status == 0 and ran == [live.id]
    assert "vmm.restore" in [e.fields["step"] for e in rec.kinds(EventKind.STEP)]


def test_max_sessions_is_busy(cfg: Config) -> None:
    rt = Runtime(cfg, machinery=fakes.machinery(), max_sessions=2)
    try:
        lives = [rt.start(build(cfg, command=["sleep", "600"])) for _ in range(2)]
        with pytest.raises(Busy, match="max_sessions = 2") as e:
            rt.start(build(cfg, command=["true"]))
        assert e.value.http_status == 429
        assert {s.id for s in rt.sessions()} == {s.id for s in lives}
    finally:
        assert rt.shutdown("test over", timeout=30) == []


def test_busy_at_one_session_says_one_session(cfg: Config) -> None:
    rt = Runtime(cfg, machinery=fakes.machinery(), max_sessions=1)
    try:
        rt.start(build(cfg, command=["sleep", "600"]))
        with pytest.raises(Busy) as e:
            rt.start(build(cfg, command=["true"]))
        assert e.value.message.startswith("1 session is running, the most"), e.value.message
    finally:
        assert rt.shutdown("test over", timeout=30) == []


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"command": ["true"], "memory_mib": 1 << 24}, "memory_mib 16777216 is out of range"),
    ({"command": ["true"], "vcpus": 0}, "vcpus 0 is out of range"),
    ({"command": ["true"], "idle_timeout_s": -1}, "idle_timeout_s -1 is out of range"),
    # A bool is not a number, and messages show values as people write them, not Python reprs.
    ({"command": ["true"], "vcpus": True}, "vcpus true is not an integer: give an integer from 1 to 64"),
    ({"command": ["true"], "ready_timeout_s": "5"}, 'ready_timeout_s "5" is not a number of seconds'),
    ({"command": ["true"], "url": "http://x/"}, "a URL goes with a profile"),
    ({"profile": "chromium", "url": "javascript:alert(1)"}, "invalid URL"),
    ({"profile": "chromium", "url": "http://a b/"}, "invalid URL"),
    ({"profile": "chromium", "command": ["sh"]}, "a profile runs its own command"),
    ({"profile": "nope"}, "no profile named 'nope'"),
    ({"command": ["true"], "image": "../etc"}, "invalid image name"),
    ({"command": ["true"], "image": "absent"}, "image 'absent' not found"),
    ({"command": ["true"], "name": "a;b"}, "invalid session name"),
    ({"command": ["a\0b"]}, "without NUL"),
    ({}, "no command given"),
    ({"command": ["true"], "backend": "bhyve"}, "unknown backend"),
])
def test_bad_requests_are_refused_before_anything_exists(cfg: Config, kwargs: dict[str, Any], text: str) -> None:
    before = leftovers(cfg)
    with pytest.raises((InvalidInput, NotFound), match=text.replace("(", r"\(")):
        build(cfg, **kwargs)
    assert leftovers(cfg) == before


def test_memory_above_the_host_is_refused_with_that_reason(cfg: Config) -> None:
    from dispo.settings import host_memory_mib

    with pytest.raises(InvalidInput, match=r"this host's memory"):
        build(cfg, command=["true"], memory_mib=host_memory_mib() + 1)


def test_cancel_token_checks(cfg: Config) -> None:
    from dispo.runtime.live import CancelToken

    token = CancelToken()
    token.check()
    token.set("because")
    with pytest.raises(Cancelled, match="because"):
        token.check()


def wait_gone(pids: Callable[[], list[int]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while pids():
        assert time.monotonic() < deadline, f"still running: {pids()}"
        time.sleep(0.05)


@pytest.mark.root  # gc and verify read the host's nftables
def test_sessions_of_a_killed_owner_are_reclaimed(cfg: Config, tmp_path: Path) -> None:
    """kill -9 of the process that owns a session: the VMM dies with it (parent-death signal), its journal
    lock is free, and reclaim undoes the rest (here the disk) from the journal."""
    before = leftovers(cfg)
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, str(fakes.config_file(tmp_path))],
                             stdout=subprocess.PIPE,
                             text=True, cwd=fakes.REPO, env=fakes.env(tmp_path))
    try:
        assert owner.stdout is not None
        sid = owner.stdout.readline().strip()
        assert len(sid) == 8, sid
        vmm = fakes.fake_vmm_pids(sid)
        assert vmm
        owner.kill()
        owner.wait()
        wait_gone(lambda: fakes.fake_vmm_pids(sid))  # died with its owner, nobody had to run gc
        assert (cfg.disks_dir / sid).exists()  # what is not a process waits for the reclaim
        report = Runtime(cfg, machinery=fakes.machinery()).reclaim()
        assert sid in report.reclaimed and not report.failed
        assert leftovers(cfg) == before
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid in fakes.fake_vmm_pids(state_dir=cfg.state_dir):
            os.kill(pid, signal.SIGKILL)


_FAULTED = """
import sys
from pathlib import Path
from dispo import config
from dispo.runtime import Runtime, build
from tests import fakes
cfg = config.load(Path(sys.argv[1]), env={})
live = Runtime(cfg, machinery=fakes.machinery()).start(build(cfg, command=["sleep", "600"]))
live.wait(60)
print("the fault switch did not fire", live.status(), flush=True)
"""


@pytest.mark.root  # gc and verify read the host's nftables
@pytest.mark.parametrize("step", [s.name for s in STEPS])
def test_kill_9_after_every_step_then_the_next_command_reclaims(cfg: Config, tmp_path: Path, step: str) -> None:
    """DISPO_FAULT_KILL_AFTER=<step> makes the owner SIGKILL itself right after that step; the next dispo
    command of any kind sweeps what it left, and `dispo verify` finds nothing."""
    before = leftovers(cfg)
    env = {**fakes.env(tmp_path), "DISPO_FAULT_KILL_AFTER": step}
    child = subprocess.run([sys.executable, "-c", _FAULTED, str(fakes.config_file(tmp_path))], env=env,
                           cwd=fakes.REPO, capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    wait_gone(lambda: fakes.fake_vmm_pids(state_dir=cfg.state_dir))
    nxt = subprocess.run([sys.executable, "-m", "dispo", "image", "ls"], env=fakes.env(tmp_path), cwd=fakes.REPO,
                         capture_output=True, text=True, timeout=60, check=False)
    assert nxt.returncode == 0 and "reclaimed 1 session(s) whose owner died" in nxt.stderr, nxt.stderr
    assert leftovers(cfg) == before
    # The crash path gets its disposal receipt too: every journaled object checked gone, the image compared.
    shown = subprocess.run([sys.executable, "-m", "dispo", "receipt", "--last"], env=fakes.env(tmp_path),
                           cwd=fakes.REPO, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "ended: reclaimed: its owner (dispo, pid " in shown.stdout, shown.stdout
    assert "image minimal" in shown.stdout and "unchanged" in shown.stdout, shown.stdout
    assert "no exit status" in shown.stdout and "None" not in shown.stdout, shown.stdout
    last = receipt.find(cfg)
    assert last is not None and last["clean"] and last["exit_status"] is None
    assert last["checked"] == len(last["objects"]) + 1  # each journaled object, and the state dir
    assert step == "validate" or any("path=" in o for o in last["objects"]), last["objects"]
    verify = subprocess.run([sys.executable, "-m", "dispo", "verify"], env=fakes.env(tmp_path), cwd=fakes.REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stdout


@pytest.mark.root
def test_a_full_workspace_ends_the_session_with_that_reason(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount a small filesystem")
    from tests.worlds import loop_fs

    with loop_fs(tmp_path / "fs", "ext4", "128M") as mnt:
        cfg = fakes.config(tmp_path, workspace=mnt / "ws")
        rt = Runtime(cfg, machinery=fakes.machinery())
        live = rt.start(build(cfg, command=["sleep", "600"]))
        deadline = time.monotonic() + 20
        while live.state is not SessionState.RUNNING:
            assert time.monotonic() < deadline and not live.ended, live.status()
            time.sleep(0.02)
        # What a guest writing its disk full does to the workspace (here written from the host side).
        subprocess.run(["fallocate", "-l", "200M", str(mnt / "filler")], check=False)
        assert live.wait(30), live.status()
        assert live.error is not None and "is full" in live.error.message, live.status()
        assert live.end_reason.startswith(f"failed: the workspace {cfg.workspace} is full")
        assert live.receipt is not None and live.receipt.clean
        assert fakes.fake_vmm_pids(state_dir=cfg.state_dir) == []
