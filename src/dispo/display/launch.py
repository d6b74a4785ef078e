"""Run a profile's app in a booted guest and show it on the host: the `web` viewer or `x11` forwarding.

Both go through the session's SSH: `ssh ... dispo-app web|x11 -- ARGV` in the guest (guest/app.sh). The
ssh process is journaled (kind "process") before it runs, behind the same one-line gate as QEMU, so a
crashed dispo leaves nothing `dispo gc` cannot find. The app's exit (ssh returns) ends the session; so do
the viewer's End-session button, Ctrl-C/SIGTERM (dispo unwinds) and the guest's death.

`web`: the guest's Xvnc listens on its own loopback only; ssh forwards it to a unix socket in the session's
state dir (root-only), which the token-protected WebViewer bridges to noVNC on 127.0.0.1. Nothing on the
guest's network, other guests included, reaches the VNC server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from dispo import guest as guest_files
from dispo import processes, ssh
from dispo.display.viewer import Target, WebViewer
from dispo.errors import InvalidInput, VmmError
from dispo.proc import minimal_env
from dispo.session import Session
from dispo.vmm.boot import Guest

VNC_PORT = 5900
DEFAULT_GEOMETRY = "1280x800"
APP_LOG = "app.log"


class DisplayError(VmmError):
    """The app or its display did not come up."""


def _with_options(argv: list[str], options: Sequence[str]) -> list[str]:
    """ssh options go before the destination, which ssh.ssh_argv puts last."""
    return [*argv[:-1], *options, argv[-1]]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class AppProcess:
    """The ssh running dispo-app in the guest, journaled before it runs and stopped on unwind."""

    def __init__(self, s: Session, argv: list[str], env: dict[str, str], what: str) -> None:
        self.log_path = s.state_path / APP_LOG
        try:
            with open(self.log_path, "ab") as out:
                spawned = processes.spawn_recorded(s.journal, argv, what=what, stdout=out, env=env,
                                                   term_timeout="3")
        except processes.SpawnFailed:
            raise DisplayError(f"ssh for the app exited at once: {_tail(self.log_path, 3)}") from None
        self.proc, self.start = spawned.proc, spawned.starttime
        s.stack.callback(self.stop)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is None:
            processes.terminate(self.proc.pid, self.start, term_timeout=3)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1)

    def failure(self, message: str) -> DisplayError:
        log = _tail(self.log_path)
        return DisplayError(f"{message}" + (f"; app output:\n{log}" if log else ""),
                            hint="see the app's messages above; a bigger ready timeout helps under TCG")


def _vnc_greeting(path: Path) -> bool:
    """True once a VNC server answers through the forward (ssh accepts on the socket before Xvnc is up,
    then closes the connection: no greeting yet)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            return sock.recv(12).startswith(b"RFB ")
    except OSError:
        return False


def _watch(app: AppProcess, g: Guest, stop: threading.Event | None = None) -> int:
    """Until the app exits (its status), the stop event (0) or the guest dies (raises)."""
    while True:
        rc = app.poll()
        if rc is not None:
            return rc
        if stop is not None and stop.wait(0.3):
            return 0
        if stop is None:
            time.sleep(0.3)
        if not g.vmm.running():
            raise g.vmm.failure("the guest stopped while the app ran")


def run_web(s: Session, g: Guest, app_argv: Sequence[str], *, timeout: float, open_viewer: bool = False,
            geometry: str = DEFAULT_GEOMETRY, out: TextIO = sys.stdout) -> int:
    """The app on the guest's private Xvnc, shown by a token-protected viewer; returns the app's status."""
    sock = s.state_path / "vnc.sock"
    sock.unlink(missing_ok=True)
    remote = ssh.remote_command([guest_files.APP_PATH, "web", geometry, "--", *app_argv])
    argv = _with_options(g.ssh_argv(), ["-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindMask=0177",
                                        "-L", f"{sock}:127.0.0.1:{VNC_PORT}"])
    app = AppProcess(s, [*argv, remote], minimal_env(), "app-ssh")
    deadline = time.monotonic() + timeout
    while not _vnc_greeting(sock):
        if (rc := app.poll()) is not None:
            raise app.failure(f"the app's display did not start (ssh exited with status {rc})")
        if not g.vmm.running():
            raise g.vmm.failure("the guest stopped while its display started")
        if time.monotonic() > deadline:
            raise app.failure(f"no VNC display from the guest after {timeout:.0f} s")
        time.sleep(0.3)
    stop = threading.Event()
    viewer = WebViewer(Target(unix=str(sock)), session_id=s.session_id, on_stop=stop.set)
    viewer.start()
    s.stack.callback(viewer.stop)
    (s.state_path / "viewer.url").write_text(viewer.url + "\n")
    print(f"dispo: session {s.session_id}: viewer at {viewer.url}", file=sys.stderr, flush=True)
    print(viewer.url, file=out, flush=True)
    if open_viewer:
        _open(viewer.url)
    return _watch(app, g, stop)


def _open(url: str) -> None:
    # As root, a desktop browser is usually not wanted or not allowed; say so instead of failing.
    try:
        if not webbrowser.open(url):
            print("dispo: no browser to open the viewer with; open the URL above", file=sys.stderr)
    except webbrowser.Error:
        print("dispo: no browser to open the viewer with; open the URL above", file=sys.stderr)


def check_x11() -> str:
    display = os.environ.get("DISPLAY", "")
    if not display:
        raise InvalidInput("--display x11 needs an X display, and $DISPLAY is not set",
                           hint="run from an X session (or ssh -X), or use --display web")
    return display


def run_x11(s: Session, g: Guest, app_argv: Sequence[str]) -> int:
    """The app's windows on the host's $DISPLAY through ssh's untrusted X11 forwarding."""
    display = check_x11()
    extra = {"DISPLAY": display}
    if "XAUTHORITY" in os.environ:
        extra["XAUTHORITY"] = os.environ["XAUTHORITY"]
    remote = ssh.remote_command([guest_files.APP_PATH, "x11", "--", *app_argv])
    # -X is untrusted forwarding: the guest's clients cannot read other windows or the keyboard.
    argv = _with_options(g.ssh_argv(), ["-X", "-o", "ForwardX11Trusted=no", "-o", "ForwardX11Timeout=0"])
    app = AppProcess(s, [*argv, remote], minimal_env(extra), "app-ssh")
    print(f"dispo: session {s.session_id}: app on display {display}", file=sys.stderr, flush=True)
    return _watch(app, g)
