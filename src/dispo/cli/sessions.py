"""`dispo ls`, `dispo gc`, `dispo disk`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from dispo import gc, journal
from dispo.cli.common import command, print_table, run_host_command
from dispo.config import Config
from dispo.session import open_session


def register(sub: Any) -> None:
    ls = sub.add_parser("ls", help="list live sessions")
    ls.add_argument("--all", action="store_true", help="also list dead sessions that 'dispo gc' would clean")
    ls.set_defaults(func=cmd_ls)

    gc = sub.add_parser("gc", help="undo what sessions whose owner died left behind")
    gc.set_defaults(func=cmd_gc)

    disk = sub.add_parser(
        "disk", help="open a disposable disk of an image and run a host command on it",
        description="Open a private copy-on-write disk of IMAGE, run CMD on the host with $DISPO_DISK set to its "
                    "path (without CMD: print the path and wait for Ctrl-C), then delete the disk.")
    disk.add_argument("--image", required=True)
    disk.add_argument("--name", help="a name for the session (shown by 'dispo ls')")
    disk.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    disk.set_defaults(func=cmd_disk)


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    rows = []
    for info in journal.scan(cfg.state_dir):
        if not info.alive and not args.all:
            continue
        m = info.meta
        age = time.time() - float(m.get("created", time.time()))
        rows.append((info.session_id, str(m.get("name") or "-"), str(m.get("purpose", "")), str(m.get("image", "-")),
                     str(m.get("owner_pid", "?")), "live" if info.alive else "dead", f"{age:.0f}s",
                     str(len(info.resources))))
    print_table(("ID", "NAME", "PURPOSE", "IMAGE", "PID", "STATE", "AGE", "OBJECTS"), rows)
    return 0


def cmd_gc(args: argparse.Namespace, cfg: Config) -> int:
    report = gc.collect(cfg)
    for sid in report.reclaimed:
        print(f"reclaimed session {sid}")
    for what in report.undone:
        print(f"  undone: {what}")
    for what in report.orphans:
        print(f"removed orphan {what}")
    for err in report.failed:
        print(f"dispo: error: {err.one_line()}", file=sys.stderr)
    if not report.reclaimed and not report.failed and not report.orphans:
        print("nothing to clean")
    return 1 if report.failed else 0


def cmd_disk(args: argparse.Namespace, cfg: Config) -> int:
    cmd = command(args.cmd, "dispo disk --image NAME -- CMD [ARG ...]")
    with open_session(cfg, image=args.image, name=args.name) as s:
        print(f"session {s.session_id}: disk {s.disk}", file=sys.stderr, flush=True)
        if not cmd:
            print(s.disk, flush=True)
            signal.pause()
            return 0
        return run_host_command(cmd, {"DISPO_DISK": str(s.disk), "DISPO_SESSION": s.session_id})
