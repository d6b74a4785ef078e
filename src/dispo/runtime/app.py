"""The session's app: the command or display program run in the guest through the guest channel.

The host side is one process (ssh today), journaled (kind "process") before it runs, behind the same
gate as the VMM, and stopped before the VMM on unwind. Its output is either the caller's terminal
(`Stdio.TERMINAL`, `dispo run` in-process) or captured into OUTPUT events, capped, for the service.

Web displays: the guest's Xvnc listens on the guest's loopback only; the channel forwards it to `vnc.sock`
in the root-only state dir, and the session's `ViewerHost` (runtime/live.py; the CLI's or dispod's, from
web/viewers.py) serves it behind a token.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from dispo.config import Config
from dispo.errors import ConfigError, DisplayError, SpawnFailed
from dispo.infra import processes
from dispo.infra.journal import sessions_root
from dispo.infra.proc import minimal_env
from dispo.infra.txn import Transaction
from dispo.names import SESSION_ID_LEN
from dispo.vmm.base import tail
from dispo.vmm.qemu import AGENT_SOCKET, QMP_SOCKET

APP_LOG = "app.log"
VNC_SOCKET = "vnc.sock"
AUTOMATION_SOCKET = "automation.sock"  # an automation session's debugging port, forwarded like the display
DEFAULT_GEOMETRY = "1280x800"
OUTPUT_CAP = 16 << 20  # bytes of captured output a session may send; the rest is dropped, with a notice
LOG_CAP = 4 << 20  # bytes app.log holds at most (it is in the state dir: on tmpfs, host memory)
SSH_LOST = 255  # ssh's own failure status
SUN_PATH_MAX = 107  # bytes of a unix socket's address (sun_path, less its closing NUL)
# Every socket a session binds in its state dir: the VMM's (QEMU's QMP and agent) and the app's.
SESSION_SOCKETS = (QMP_SOCKET, AGENT_SOCKET, VNC_SOCKET, AUTOMATION_SOCKET)


def check_socket_room(cfg: Config) -> None:
    """ConfigError when the longest socket path a session would bind (STATE_DIR/sessions/ID/NAME.sock) does not
    fit a unix socket's address: bind() would fail deep inside the session (QEMU "could not be started"), so
    this is checked before a session makes anything."""
    longest = sessions_root(cfg.state_dir) / ("0" * SESSION_ID_LEN) / max(SESSION_SOCKETS, key=len)
    size = len(os.fsencode(longest))
    if size > SUN_PATH_MAX:
        raise ConfigError(f"state_dir {cfg.state_dir} is too deep: a session's socket path such as {longest} "
                          f"is {size} bytes, more than the {SUN_PATH_MAX} a unix socket allows",
                          hint=f"set state_dir in the config (or DISPO_STATE_DIR) to a path at least "
                               f"{size - SUN_PATH_MAX} bytes shorter")


OutputSink = Callable[[str, bytes], None]  # (stream name, bytes)


class AppProcess:
    """The host process that runs the app in the guest; journaled before it runs, stopped on unwind."""

    def __init__(self, tx: Transaction, argv: list[str], *, what: str, env: dict[str, str] | None = None,
                 terminal: bool = False, output: OutputSink | None = None, keep_stdin: bool = False,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.log_path = tx.state_path / APP_LOG
        self._pumps: list[threading.Thread] = []
        self._sent = 0
        self._output = output
        out: IO[bytes] | int | None
        err: IO[bytes] | int | None
        logged = -1  # the write end of the pipe into app.log, while the child is being started
        if terminal:
            out, err = None, None
        elif output is not None:
            out, err = subprocess.PIPE, subprocess.PIPE
        else:
            # A display app's output: the guest's, so it goes through a pipe into app.log, capped.
            src, logged = os.pipe()
            self._pumps.append(pump_log(src, self.log_path))
            out, err = logged, subprocess.STDOUT
        try:
            spawned = processes.spawn_recorded(tx.journal, argv, what=what, stdout=out, stderr=err,
                                               env=env if env is not None else minimal_env(),
                                               keep_stdin=terminal or keep_stdin, new_session=not terminal,
                                               term_timeout="3")
        except SpawnFailed:
            if logged >= 0:
                os.close(logged)
                logged = -1
                for t in self._pumps:
                    t.join(5)
            raise DisplayError(f"{what} exited at once: {tail(self.log_path, 3)}") from None
        finally:
            if logged >= 0:
                os.close(logged)
        self.proc, self.start = spawned.proc, spawned.starttime
        tx.stack.callback(self.stop)
        if output is not None:
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
                assert stream is not None
                t = threading.Thread(target=self._pump, args=(name, stream), daemon=True, name=f"dispo-{name}")
                t.start()
                self._pumps.append(t)
        if on_exit is not None:  # told once the process exited and its output is in (the watcher looks at once)
            threading.Thread(target=self._tell_exit, args=(on_exit,), daemon=True, name="dispo-app-exit").start()

    def _tell_exit(self, on_exit: Callable[[], None]) -> None:
        with contextlib.suppress(OSError):
            self.proc.wait()
        for t in self._pumps:
            t.join(5)
        on_exit()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        assert self._output is not None
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(stream.fileno(), 65536):
                room = OUTPUT_CAP - self._sent
                if room <= 0:
                    continue  # keep draining so the guest side never blocks; drop what is over the cap
                self._sent += min(room, len(chunk))
                self._output(name, chunk[:room])

    def poll(self) -> int | None:
        """The exit status once the process ended and its output was all delivered."""
        rc = self.proc.poll()
        if rc is None:
            return None
        for t in self._pumps:
            t.join(5)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            processes.terminate(self.proc.pid, self.start, term_timeout=3)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def failure(self, message: str) -> DisplayError:
        log = tail(self.log_path, 15)
        return DisplayError(f"{message}" + (f"; app output:\n{log}" if log else ""),
                            hint="see the app's messages above; a bigger ready timeout helps under TCG")


def pump_log(fd: int, path: Path, cap: int = LOG_CAP) -> threading.Thread:
    """A thread that copies what arrives on the pipe `fd` into the log `path` and keeps only its last part:
    the app's output is the guest's to choose, and the log is on tmpfs. When the log would pass `cap`, its
    older half goes, and its first line says how many bytes were dropped so far. Everything is still read
    (the app never blocks on its output)."""

    def copy() -> None:
        dropped = 0
        marker = b""
        with contextlib.suppress(OSError, ValueError), open(fd, "rb", buffering=0) as src, \
                open(path, "a+b", buffering=0) as log:
            size = log.seek(0, os.SEEK_END)
            while chunk := src.read(65536):
                if size + len(chunk) <= cap:
                    log.write(chunk)
                    size += len(chunk)
                    continue
                # Keep the last quarter of the cap, from a line's start when one is near.
                kept = os.pread(log.fileno(), size - len(marker), len(marker)) + chunk
                cut = len(kept) - cap // 4
                newline = kept.find(b"\n", cut, cut + 4096)
                cut = newline + 1 if newline >= 0 else cut
                dropped += cut
                marker = b"[dispo: %d bytes of the app's output dropped here; app.log keeps the last part]\n" % dropped
                log.truncate(0)
                log.write(marker + kept[cut:])
                size = len(marker) + len(kept) - cut

    t = threading.Thread(target=copy, name="dispo-app-log", daemon=True)
    t.start()
    return t


def vnc_greeting(path: Path) -> bool:
    """True once a VNC server answers through the forward (ssh accepts on the socket before Xvnc is up,
    then closes the connection: no greeting yet)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            return sock.recv(12).startswith(b"RFB ")
    except OSError:
        return False


def app_env(x11: bool) -> dict[str, str]:
    """The environment of the app's host process: minimal, plus the X display for x11 forwarding."""
    if not x11:
        return minimal_env()
    extra = {"DISPLAY": os.environ.get("DISPLAY", "")}
    if "XAUTHORITY" in os.environ:
        extra["XAUTHORITY"] = os.environ["XAUTHORITY"]
    return minimal_env(extra)
