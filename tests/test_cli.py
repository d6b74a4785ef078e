"""The `dispo` command as a user runs it: one-line errors with a hint, ls, gc after a crash, the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fakes
from tests.worlds import dispo_env, host_objects, loop_fs, make_ext4, sh

DISPO = [sys.executable, "-m", "dispo.cli.main"]


def dispo(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*DISPO, *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"dispo {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dispo: error: ") and "(hint: " in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount btrfs: run the suite with sudo")
    with loop_fs(tmp_path / "fs", "btrfs", "1G") as mnt:
        ws, state = mnt / "dispo", tmp_path / "state"
        yield dispo_env(ws, state), ws, state


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\nbackend = "zfs"\n')
    proc = subprocess.run([*DISPO, "--config", str(cfg), "image", "ls"], capture_output=True, text=True)
    line = one_line_error(proc)
    assert str(cfg) in line and "storage.backend" in line


def test_unknown_image_is_one_line(tmp_path: Path) -> None:
    env = dispo_env(tmp_path / "ws", tmp_path / "state")
    line = one_line_error(dispo(env, "disk", "--image", "nope", "--", "true", check=False))
    assert "image 'nope' not found" in line and "dispo image ls" in line
    assert not (tmp_path / "state" / "sessions").exists() or not any((tmp_path / "state" / "sessions").iterdir())


def test_a_state_dir_too_deep_for_a_sessions_sockets_is_one_line_before_anything_exists(tmp_path: Path) -> None:
    """A session binds unix sockets in STATE_DIR/sessions/ID/ (QEMU's QMP and agent, VNC, automation); past 107
    bytes bind() fails deep inside the session. `dispo run` says so first, in one line, and makes nothing."""
    fakes.config(tmp_path)  # the image "minimal": the run gets as far as starting a session
    deep = tmp_path / "deep" / ("d" * max(1, 120 - len(str(tmp_path / "deep"))))
    ws_before = sorted(str(p) for p in (tmp_path / "ws").rglob("*"))
    env = dict(fakes.env(tmp_path), DISPO_STATE_DIR=str(deep))
    line = one_line_error(dispo(env, "run", "--", "true", check=False))
    longest = deep / "sessions" / "00000000" / "automation.sock"
    assert line == (f"dispo: error: state_dir {deep} is too deep: a session's socket path such as {longest} is "
                    f"{len(str(longest))} bytes, more than the 107 a unix socket allows (hint: set state_dir in the "
                    f"config (or DISPO_STATE_DIR) to a path at least {len(str(longest)) - 107} bytes shorter)"), line
    assert not (tmp_path / "deep").exists()  # no state dir, no journal, no lock
    assert sorted(str(p) for p in (tmp_path / "ws").rglob("*")) == ws_before  # no disk, no lease
    ok = tmp_path / "s"  # the same run from a state dir that fits gets past the check (to the missing kernel)
    assert "too deep" not in dispo(dict(env, DISPO_STATE_DIR=str(ok)), "run", "--", "true", check=False).stderr


@pytest.mark.root
@pytest.mark.parametrize("bad", ["a/b", "../../etc", "has space", "x;id", "$(id)"])
def test_cli_bad_names(world: tuple[dict[str, str], Path, Path], tmp_path: Path, bad: str) -> None:
    env, ws, state = world
    img = make_ext4(tmp_path / "i.ext4")
    before = host_objects(ws, state)
    line = one_line_error(dispo(env, "image", "import", str(img), "--name", bad, check=False))
    assert "invalid image name" in line
    assert host_objects(ws, state) == before


@pytest.mark.root
def test_cli_bad_size_and_file(world: tuple[dict[str, str], Path, Path], tmp_path: Path) -> None:
    env, _ws, _state = world
    img = make_ext4(tmp_path / "i.ext4", "32M")
    assert "smaller than the image" in one_line_error(
        dispo(env, "image", "import", str(img), "--name", "x", "--size", "8M", check=False))
    assert "invalid size" in one_line_error(
        dispo(env, "image", "import", str(img), "--name", "x", "--size", "lots", check=False))
    text = tmp_path / "notes.txt"
    text.write_text("not a filesystem\n" * 200)
    assert "not an ext4 filesystem" in one_line_error(
        dispo(env, "image", "import", str(text), "--name", "x", check=False))
    assert "does not exist" in one_line_error(
        dispo(env, "image", "import", str(tmp_path / "absent"), "--name", "x", check=False))
    assert dispo(env, "image", "ls").stdout.splitlines()[1:] == []


def _start_disk_session(env: dict[str, str], image: str) -> tuple[subprocess.Popen[str], str, Path]:
    """`dispo disk` without CMD waits for Ctrl-C, so it wants a terminal: its stdin is a pseudo-terminal."""
    controller, terminal = os.openpty()
    try:
        child = subprocess.Popen([*DISPO, "disk", "--image", image], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, stdin=terminal)
    finally:
        os.close(terminal)
    _TERMINALS[child.pid] = controller  # closed with the test's process table (never read)
    assert child.stderr is not None and child.stdout is not None
    line = child.stderr.readline()
    assert line.startswith("session "), line + child.stderr.read()
    sid = line.split()[1].rstrip(":")
    disk = Path(child.stdout.readline().strip())
    return child, sid, disk


_TERMINALS: dict[int, int] = {}


@pytest.fixture(autouse=True)
def _close_terminals() -> Iterator[None]:
    yield
    while _TERMINALS:
        os.close(_TERMINALS.popitem()[1])


@pytest.mark.root
def test_disk_without_a_command_or_a_terminal_says_so(world: tuple[dict[str, str], Path, Path],
                                                      tmp_path: Path) -> None:
    """With no CMD it would wait for a Ctrl-C nobody can send: one line instead, and nothing made."""
    env, ws, state = world
    dispo(env, "image", "import", str(make_ext4(tmp_path / "i.ext4")), "--name", "base", "--quiet")
    before = host_objects(ws, state)
    try:
        proc = dispo(env, "disk", "--image", "base", check=False)  # stdin /dev/null, output to pipes
    except subprocess.TimeoutExpired:
        raise AssertionError("dispo disk without a command or a terminal waited") from None
    line = one_line_error(proc)
    assert "needs a command, or a terminal" in line and "-- CMD" in line
    assert host_objects(ws, state) == before


@pytest.mark.root
def test_gc_after_sigkill(world: tuple[dict[str, str], Path, Path], tmp_path: Path) -> None:
    env, ws, state = world
    dispo(env, "image", "import", str(make_ext4(tmp_path / "i.ext4")), "--name", "base", "--quiet")
    before = host_objects(ws, state)
    child, sid, disk = _start_disk_session(env, "base")
    try:
        during = host_objects(ws, state)
        assert disk.exists() and during["session_disks"] == {sid} and sid in during["journals"]
        assert f"dispo/sessions/{sid}" in during["subvolumes"]
        ls = dispo(env, "ls").stdout
        assert sid in ls and "live" in ls
        assert "nothing to clean" in dispo(env, "gc").stdout  # a live session is not touched
        assert disk.exists()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert host_objects(ws, state) == during  # a crash leaves it all behind...
        assert sid not in dispo(env, "ls").stdout
        assert "dead" in dispo(env, "ls", "--all").stdout
        out = dispo(env, "gc").stdout
        assert f"reclaimed session {sid}" in out and "btrfs-subvolume" in out
        assert host_objects(ws, state) == before  # ...and gc undoes every recorded object
        assert "nothing to clean" in dispo(env, "gc").stdout  # twice is harmless
    finally:
        child.kill()
        child.wait()


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_tear_down(world: tuple[dict[str, str], Path, Path], tmp_path: Path, sig: signal.Signals) -> None:
    env, ws, state = world
    dispo(env, "image", "import", str(make_ext4(tmp_path / "i.ext4")), "--name", "base", "--quiet")
    before = host_objects(ws, state)
    child, _sid, disk = _start_disk_session(env, "base")
    try:
        assert disk.exists()
        child.send_signal(sig)
        rc = child.wait(30)
        assert rc in (128 + sig, 130)
        assert host_objects(ws, state) == before
    finally:
        child.kill()
        child.wait()


@pytest.mark.root
def test_disk_runs_a_command_and_passes_its_status(world: tuple[dict[str, str], Path, Path], tmp_path: Path) -> None:
    env, ws, state = world
    dispo(env, "image", "import", str(make_ext4(tmp_path / "i.ext4")), "--name", "base", "--quiet")
    before = host_objects(ws, state)
    proc = dispo(env, "disk", "--image", "base", "--", "sh", "-c", 'test -f "$DISPO_DISK" && exit 7', check=False)
    assert proc.returncode == 7, proc.stderr
    assert host_objects(ws, state) == before


@pytest.mark.root
def test_demo(world: tuple[dict[str, str], Path, Path]) -> None:
    env, ws, state = world
    proc = dispo(env, "demo")
    assert "in the session disk: True" in proc.stdout
    assert "image hash unchanged: True" in proc.stdout
    assert "session disk still exists: False" in proc.stdout
    assert "storage backend: btrfs" in proc.stdout
    objs = host_objects(ws, state)
    assert objs["session_disks"] == set() and objs["journals"] == set()
    assert objs["image_entries"] == {"dispo-demo"}
    sh("true")


@pytest.mark.root
def test_gc_after_reboot_sweeps_disks_without_journal(world: tuple[dict[str, str], Path, Path], tmp_path: Path) -> None:
    """/run is tmpfs: after a reboot the journals are gone but session disks in the workspace remain."""
    env, ws, state = world
    dispo(env, "image", "import", str(make_ext4(tmp_path / "i.ext4")), "--name", "base", "--quiet")
    before = host_objects(ws, state)
    child, sid, disk = _start_disk_session(env, "base")
    try:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        sh("rm", "-rf", state)  # what a reboot does to /run
        (ws / "images" / ".import-0badc0de-half").mkdir()  # an import cut short by the same reboot
        assert disk.exists()
        out = dispo(env, "gc").stdout
        assert f"orphan {ws / 'sessions' / sid}" in out and ".import-0badc0de-half" in out
        after = host_objects(ws, state)
        assert after["session_disks"] == set() and after["subvolumes"] == before["subvolumes"]
        assert after["image_entries"] == {"base"}
        assert "nothing to clean" in dispo(env, "gc").stdout
    finally:
        child.kill()
        child.wait()


@pytest.mark.root
def test_cli_read_only_workspace(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "ro,size=8m", "tmpfs", ro)
    try:
        env = dispo_env(ro / "dispo", tmp_path / "state")
        line = one_line_error(dispo(env, "image", "import", str(make_ext4(tmp_path / "i.ext4")), "--name", "x",
                                    check=False))
        assert "read-only filesystem" in line and "DISPO_WORKSPACE" in line
        assert list(ro.iterdir()) == []
    finally:
        sh("umount", ro)
