"""`dispo run`, `dispo ssh ID`, `dispo stop ID`: boot a disposable guest, get into it, end it."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispo import journal, ssh
from dispo.config import Config
from dispo.errors import InvalidInput, JournalError, NotFound, VmmError
from dispo.images import ImageStore
from dispo.names import check_session_id
from dispo.proc import minimal_env
from dispo.session import open_session
from dispo.vmm.base import GuestFailure, tail
from dispo.vmm.boot import DEFAULT_READY_TIMEOUT_S, boot, choose_backend

STOP_TIMEOUT_S = 60.0
SSH_LOST = 255  # ssh's own failure status


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="boot a disposable guest, run CMD in it (or a shell), then throw it all away",
        description="Boot IMAGE in a microVM on a private copy-on-write disk and its own tap behind NAT, wait "
                    "until it answers on SSH, run CMD as the unprivileged user (an interactive shell without "
                    "CMD), exit with CMD's status and remove everything the session made.")
    run.add_argument("--image", default="minimal", help="image to boot (default: minimal)")
    run.add_argument("--backend", choices=("auto", "qemu", "firecracker"), default="auto")
    run.add_argument("--memory", type=int, default=512, metavar="MiB", help="guest memory (default 512)")
    run.add_argument("--vcpus", type=int, default=1, metavar="N", help="guest vCPUs (default 1)")
    run.add_argument("--name", help="a name for the session (shown by 'dispo ls')")
    run.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, metavar="S",
                     help=f"seconds to wait for the guest's SSH (default {DEFAULT_READY_TIMEOUT_S:.0f})")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    run.set_defaults(func=cmd_run)

    sh = sub.add_parser("ssh", help="open a shell (or run CMD) in a live session's guest")
    sh.add_argument("id", help="session id (see 'dispo ls')")
    sh.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    sh.set_defaults(func=cmd_ssh)

    stop = sub.add_parser("stop", help="end a live session: its owner powers the guest off and removes everything")
    stop.add_argument("ids", nargs="+", metavar="ID")
    stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S, help="seconds to wait for the teardown")
    stop.set_defaults(func=cmd_stop)


def _command(raw: list[str], usage: str) -> list[str]:
    cmd = list(raw)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if raw and not cmd:
        raise InvalidInput("'--' must be followed by a command", hint=usage)
    return cmd


def _check_limits(memory: int, vcpus: int) -> None:
    if not 64 <= memory <= 1 << 20:
        raise InvalidInput(f"--memory {memory} is out of range", hint="give the guest memory in MiB, 64 or more")
    if not 1 <= vcpus <= 64:
        raise InvalidInput(f"--vcpus {vcpus} is out of range", hint="give 1 to 64 vCPUs")


def _run_in_guest(argv: list[str], alive: Callable[[], bool] | None = None) -> int:
    """ssh's exit status. Not proc.run(): the user's terminal and streams go straight through to the guest.
    If the VMM dies meanwhile, ssh is ended at once instead of after its keep-alive timeout."""
    proc = subprocess.Popen(argv, env=minimal_env())
    try:
        while True:
            try:
                return proc.wait(0.5)
            except subprocess.TimeoutExpired:
                if alive is not None and not alive():
                    proc.terminate()
                    proc.wait(5)
                    return SSH_LOST
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    t0 = time.monotonic()
    cmd = _command(args.cmd, "dispo run [--image NAME] -- CMD [ARG ...]")
    _check_limits(args.memory, args.vcpus)
    image = ImageStore(cfg).get(args.image)  # all input checked before anything is created
    choose_backend(args.backend, image)
    interactive = not cmd
    if interactive and not sys.stdin.isatty():
        raise InvalidInput("no command given and stdin is not a terminal", hint="dispo run -- CMD [ARG ...]")
    with open_session(cfg, image=args.image, name=args.name) as s:
        try:
            guest = boot(s, backend=args.backend, memory_mib=args.memory, vcpus=args.vcpus,
                         ready_timeout=args.ready_timeout, t0=t0)
        except GuestFailure as e:
            _show_console(e.console_tail, s.state_path / "console.log")
            raise
        print(f"dispo: session {s.session_id} ready in {guest.ready_s:.1f} s (guest {guest.address}, "
              f"{guest.vmm.kind.value}/{guest.vmm.accel.value}); 'dispo ssh {s.session_id}' for another shell",
              file=sys.stderr, flush=True)
        argv = guest.ssh_argv(tty=interactive)
        if cmd:
            argv.append(ssh.remote_command(cmd))
        rc = _run_in_guest(argv, guest.vmm.running)
        if rc == SSH_LOST and not guest.vmm.running():
            failure = guest.vmm.failure(f"the guest stopped while the command ran (QEMU exit status "
                                        f"{guest.vmm.wait_exit(0)})")
            _show_console(failure.console_tail, s.state_path / "console.log")
            raise failure
        print(f"dispo: session {s.session_id}: command exited with status {rc} after "
              f"{time.monotonic() - t0:.1f} s; tearing down", file=sys.stderr, flush=True)
        return rc


def _show_console(text: str, path: Path) -> None:
    text = text or tail(path)
    if text:
        print("dispo: guest console (last lines):", file=sys.stderr)
        for line in text.splitlines():
            print(f"  | {line}", file=sys.stderr)
        sys.stderr.flush()


def _live(cfg: Config, session_id: str) -> journal.JournalInfo:
    check_session_id(session_id)
    for info in journal.scan(cfg.state_dir):
        if info.session_id == session_id:
            if not info.alive:
                raise NotFound(f"session {session_id} is not running (its owner died)",
                               hint="'dispo gc' removes what it left behind")
            return info
    raise NotFound(f"no session {session_id}", hint="list live sessions with 'dispo ls'")


def cmd_ssh(args: argparse.Namespace, cfg: Config) -> int:
    cmd = _command(args.cmd, "dispo ssh ID -- CMD [ARG ...]")
    info = _live(cfg, args.id)
    found = ssh.load_info(info.path)
    if found is None:
        raise VmmError(f"session {args.id} has no guest that answers on SSH (yet)",
                       hint="wait until 'dispo run' says the session is ready")
    keys, address = found
    tty = not cmd and sys.stdin.isatty()
    argv = ssh.ssh_argv(keys, address, batch=not tty, tty=tty)
    if cmd:
        argv.append(ssh.remote_command(cmd))
    return _run_in_guest(argv)


def cmd_stop(args: argparse.Namespace, cfg: Config) -> int:
    infos = [_live(cfg, sid) for sid in args.ids]  # check every id before stopping any
    for info in infos:
        pid = int(info.meta.get("owner_pid", 0))
        if pid <= 1:
            raise VmmError(f"session {info.session_id} does not say which process owns it")
        # The owner unwinds on SIGTERM (power off, then its journal); it holds the journal's lock until done.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for info in infos:
        deadline = time.monotonic() + args.timeout
        while info.path.exists() and time.monotonic() < deadline:
            if _owner_gone(info.path):
                break
            time.sleep(0.1)
        if info.path.exists():
            print(f"dispo: session {info.session_id}: owner gone but objects left; run 'dispo gc'", file=sys.stderr)
        else:
            print(f"stopped {info.session_id}")
    return 0


def _owner_gone(path: Path) -> bool:
    try:
        probe = journal.Journal.load(path)
    except JournalError:
        return not path.exists()
    if probe.try_lock():
        probe.release()  # the owner is gone; whatever it left is for 'dispo gc'
        return True
    return False
