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

from dispo import journal, profiles, ssh
from dispo.cli.common import command
from dispo.config import Config
from dispo.display import launch
from dispo.errors import InvalidInput, JournalError, NotFound, VmmError
from dispo.imagebuild.recipes import RECIPES
from dispo.images import ImageStore
from dispo.names import check_session_id
from dispo.proc import minimal_env
from dispo.profiles import DisplayMode
from dispo.session import Session, open_session
from dispo.vmm.base import GuestFailure, tail
from dispo.vmm.boot import DEFAULT_READY_TIMEOUT_S, Guest, boot, choose_backend

STOP_TIMEOUT_S = 60.0
SSH_LOST = 255  # ssh's own failure status


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run an app profile (dispo run chromium [URL]) or CMD in a disposable guest, then throw it "
                    "all away",
        usage="dispo run [OPTIONS] PROFILE [URL] [OPTIONS]\n       dispo run [OPTIONS] [-- CMD [ARG ...]]",
        description="With PROFILE (chromium, firefox, or your own in /etc/dispo/profiles/NAME.toml): boot the "
                    "profile's image and run its app on the display it asks for (--display web: a viewer URL "
                    "on 127.0.0.1; x11: the host's $DISPLAY), opening URL or its start page; closing the app "
                    "ends the session. With -- CMD, or nothing: boot IMAGE, run CMD as the unprivileged user "
                    "(an interactive shell without CMD) and exit with its status. Either way, the guest runs "
                    "on a private copy-on-write disk and its own tap behind NAT, and everything is removed at "
                    "the end.")
    _add_run_options(run, argparse.SUPPRESS)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="PROFILE [URL], or -- CMD [ARG ...]")
    run.set_defaults(func=cmd_run)

    sh = sub.add_parser("ssh", help="open a shell (or run CMD) in a live session's guest")
    sh.add_argument("id", help="session id (see 'dispo ls')")
    sh.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    sh.set_defaults(func=cmd_ssh)

    stop = sub.add_parser("stop", help="end a live session: its owner powers the guest off and removes everything")
    stop.add_argument("ids", nargs="+", metavar="ID")
    stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S, help="seconds to wait for the teardown")
    stop.set_defaults(func=cmd_stop)


def _add_run_options(p: argparse.ArgumentParser, default: Any) -> None:
    """The options of `dispo run`, given before PROFILE or after it (argparse's REMAINDER takes all that
    follows the first word, so the words after PROFILE are parsed again with these)."""
    p.add_argument("--image", default=default, help="image to boot (default: minimal, or the profile's)")
    p.add_argument("--backend", choices=("auto", "qemu", "firecracker"), default=default)
    p.add_argument("--memory", type=int, default=default, metavar="MiB",
                   help="guest memory (default 512, or the profile's)")
    p.add_argument("--vcpus", type=int, default=default, metavar="N", help="guest vCPUs (default 1, or the profile's)")
    p.add_argument("--name", default=default, help="a name for the session (shown by 'dispo ls')")
    p.add_argument("--ready-timeout", type=float, default=default, metavar="S",
                   help=f"seconds to wait for the guest's SSH, and for the app's display "
                        f"(default {DEFAULT_READY_TIMEOUT_S:.0f}, or the profile's)")
    p.add_argument("--display", choices=[m.value for m in DisplayMode], default=default,
                   help="with PROFILE: where the app shows (default: the profile's)")
    p.add_argument("--open", action="store_true", default=default,
                   help="with --display web: open the viewer URL in the desktop's browser")


_RUN_DEFAULTS: dict[str, Any] = {"image": "minimal", "backend": "auto", "memory": 512, "vcpus": 1, "name": None,
                                 "ready_timeout": DEFAULT_READY_TIMEOUT_S, "display": None, "open": False}
PROFILE_USAGE = "dispo run PROFILE [URL] [--display web|x11|none] [--open]"


def _profile_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, str | None]:
    """Options given anywhere, the profile's name and the URL, from `dispo run [OPTS] PROFILE [URL] [OPTS]`."""
    given = {k: v for k, v in vars(args).items() if k in _RUN_DEFAULTS}
    rest = argparse.ArgumentParser(prog="dispo run", add_help=False, exit_on_error=False)
    _add_run_options(rest, argparse.SUPPRESS)
    try:
        later, words = rest.parse_known_args(args.cmd[1:])
    except argparse.ArgumentError as e:
        raise InvalidInput(f"dispo run {args.cmd[0]}: {e}", hint=PROFILE_USAGE) from None
    given.update(vars(later))
    for w in words:
        if w.startswith("-") and w != "-":
            raise InvalidInput(f"dispo run {args.cmd[0]}: unknown option {w!r}", hint=PROFILE_USAGE)
    if len(words) > 1:
        raise InvalidInput(f"dispo run {args.cmd[0]}: one URL at most, got {len(words)} words ({' '.join(words)})",
                           hint=f"{PROFILE_USAGE}; to run a command use 'dispo run --image NAME -- CMD'")
    return given, args.cmd[0], (words[0] if words else None)


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
    if args.cmd and args.cmd[0] != "--":
        return _run_profile(args, cfg, t0)
    opts = {**_RUN_DEFAULTS, **{k: v for k, v in vars(args).items() if k in _RUN_DEFAULTS}}
    if opts["display"] is not None or opts["open"]:
        raise InvalidInput("--display and --open go with a profile", hint=PROFILE_USAGE)
    cmd = command(args.cmd, "dispo run [--image NAME] -- CMD [ARG ...]")
    _check_limits(opts["memory"], opts["vcpus"])
    image = ImageStore(cfg).get(opts["image"])  # all input checked before anything is created
    choose_backend(opts["backend"], image)
    interactive = not cmd
    if interactive and not sys.stdin.isatty():
        raise InvalidInput("no command given and stdin is not a terminal", hint="dispo run -- CMD [ARG ...]")
    with open_session(cfg, image=opts["image"], name=opts["name"]) as s:
        guest = _boot(s, opts, t0)
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


def _boot(s: Session, opts: dict[str, Any], t0: float) -> Guest:
    try:
        guest = boot(s, backend=opts["backend"], memory_mib=opts["memory"], vcpus=opts["vcpus"],
                     ready_timeout=opts["ready_timeout"], t0=t0, policy=opts.get("policy"),
                     cmdline=tuple(opts.get("cmdline", ())))
    except GuestFailure as e:
        _show_console(e.console_tail, s.state_path / "console.log")
        raise
    print(f"dispo: session {s.session_id} ready in {guest.ready_s:.1f} s (guest {guest.address}, "
          f"{guest.vmm.kind.value}/{guest.vmm.accel.value}); 'dispo ssh {s.session_id}' for another shell",
          file=sys.stderr, flush=True)
    return guest


def _run_profile(args: argparse.Namespace, cfg: Config, t0: float) -> int:
    """`dispo run PROFILE [URL]`: the profile's app on its display; the session ends with the app."""
    given, name, url = _profile_args(args)
    profile = profiles.find(name, cfg.profiles_dir)
    opts = {"image": profile.image, "backend": profile.backend, "memory": profile.memory_mib,
            "vcpus": profile.vcpus, "name": None, "ready_timeout": profile.ready_timeout_s,
            "display": profile.display, "open": False, "policy": profile.network,
            "cmdline": (f"dispo.shm={profile.shm_mib}",), **given}
    display = DisplayMode(opts["display"])
    if not profile.command:
        raise InvalidInput(f"profile {name!r} has no command", hint=f"add command = [...] to {profile.source}")
    if display is DisplayMode.X11:
        launch.check_x11()
    _check_limits(opts["memory"], opts["vcpus"])
    try:
        image = ImageStore(cfg).get(opts["image"])
    except NotFound as e:
        if opts["image"] in RECIPES:  # the usual first run: say how to make it
            raise NotFound(e.message, hint=f"build it with 'dispo image build {opts['image']}' (a few minutes, "
                                           f"once)") from None
        raise
    choose_backend(opts["backend"], image)
    app_argv = list(profile.argv(url))
    with open_session(cfg, image=opts["image"], name=opts["name"] or name) as s:
        guest = _boot(s, opts, t0)
        if guest.vmm.accel.value == "tcg":
            print("dispo: no usable KVM here: the guest runs under TCG (emulation), so the app is slow; a "
                  "browser takes about 30 s to show its first page", file=sys.stderr, flush=True)
        timeout = float(opts["ready_timeout"])
        if display is DisplayMode.WEB:
            rc = launch.run_web(s, guest, app_argv, timeout=timeout, open_viewer=bool(opts["open"]))
        elif display is DisplayMode.X11:
            rc = launch.run_x11(s, guest, app_argv)
        else:
            rc = _run_in_guest([*guest.ssh_argv(), ssh.remote_command(app_argv)], guest.vmm.running)
        print(f"dispo: session {s.session_id}: {name} ended (status {rc}) after {time.monotonic() - t0:.1f} s; "
              f"tearing down", file=sys.stderr, flush=True)
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
    cmd = command(args.cmd, "dispo ssh ID -- CMD [ARG ...]")
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
