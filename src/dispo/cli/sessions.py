"""`dispo ls`, `dispo gc`, `dispo disk`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from dispo import gc
from dispo.cli.common import command, dispod_client, print_table, run_host_command
from dispo.config import Config
from dispo.errors import InvalidInput, NotFound
from dispo.infra import journal
from dispo.servicepaths import OWNER as DISPOD_OWNER
from dispo.storage.disks import open_session


def register(sub: Any) -> None:
    ls = sub.add_parser("ls", help="list live sessions")
    ls.add_argument("--all", action="store_true", help="also list dead sessions that 'dispo gc' would clean")
    ls.set_defaults(func=cmd_ls)

    gc = sub.add_parser("gc", help="undo what sessions whose owner died left behind")
    gc.set_defaults(func=cmd_gc)

    rc = sub.add_parser("receipt", help="show a session's disposal receipt (what was checked gone after it ended)")
    rc.add_argument("id", nargs="?", help="session id (default: --last)")
    rc.add_argument("--last", action="store_true", help="the most recent receipt")
    rc.add_argument("--json", action="store_true", help="the receipt as JSON")
    rc.set_defaults(func=cmd_receipt)

    vf = sub.add_parser("verify", help="look for anything of dispo's on this host without a live owner "
                                       "(exit 1 if found)")
    vf.set_defaults(func=cmd_verify)

    disk = sub.add_parser(
        "disk", help="open a disposable disk of an image and run a host command on it",
        description="Open a private copy-on-write disk of IMAGE, run CMD on the host with $DISPO_DISK set to its "
                    "path (without CMD, on a terminal: print the path and wait for Ctrl-C), then delete the disk.")
    disk.add_argument("--image", required=True)
    disk.add_argument("--name", help="a name for the session (shown by 'dispo ls')")
    disk.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    disk.set_defaults(func=cmd_disk)


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    """Every journal in the state dir (dispod's sessions and in-process ones alike); dispod's say their state."""
    client = dispod_client(cfg)
    if cfg.client.dispod and client is not None:  # another host's dispod, or a cluster's gateway: its own list
        return _ls_remote(client.sessions(all=args.all))
    states = {str(s["id"]): str(s["state"]) for s in client.sessions()} if client is not None else {}
    rows = []
    for info in journal.scan(cfg.state_dir):
        if not info.alive and not args.all:
            continue
        m = info.meta
        age = time.time() - float(m.get("created", time.time()))
        owner = DISPOD_OWNER if m.get("owner") == DISPOD_OWNER else str(m.get("owner_pid", "?"))
        state = states.get(info.session_id, "live") if info.alive else "dead"
        rows.append((info.session_id, str(m.get("name") or m.get("profile") or "-"), str(m.get("purpose", "")),
                     str(m.get("image", "-")), owner, state, f"{age:.0f}s", str(len(info.resources))))
    print_table(("ID", "NAME", "PURPOSE", "IMAGE", "OWNER", "STATE", "AGE", "OBJECTS"), rows)
    return 0


def _ls_remote(sessions: list[dict[str, Any]]) -> int:
    rows = []
    for s in sessions:
        age = time.time() - float(s.get("created") or time.time())
        rows.append((str(s["id"]), str(s.get("name") or s.get("profile") or "-"), str(s.get("image") or "-"),
                     str(s["state"]), f"{age:.0f}s", str(s.get("end_reason") or "")))
    print_table(("ID", "NAME", "IMAGE", "STATE", "AGE", "ENDED"), rows)
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


def cmd_receipt(args: argparse.Namespace, cfg: Config) -> int:
    from dispo import receipt
    from dispo.names import check_session_id

    if args.id is not None and args.last:
        raise InvalidInput("give a session id or --last, not both")
    sid = check_session_id(args.id) if args.id else None
    found = receipt.find(cfg, sid)
    if found is None:
        raise NotFound(f"no disposal receipt for {'session ' + sid if sid else 'any session'} in "
                       f"{receipt.receipts_path(cfg)}", hint="receipts are written when a session ends")
    if args.json:
        print(json.dumps(found, indent=1, sort_keys=True))
    else:
        clean = "clean" if found.get("clean") else "NOT CLEAN"
        print(f"session {found['session_id']}: {clean}; {found.get('checked', '?')} host object(s) checked")
        image = found.get("image") or {}
        if image:
            state = {True: "unchanged", False: "CHANGED", None: "not checked"}[found.get("image_unchanged")]
            print(f"  image {image.get('name')} (sha256 {str(image.get('sha256', ''))[:16]}...): {state}")
        for what in found.get("leftovers") or []:
            print(f"  left: {what}")
        for what in found.get("kept") or []:
            print(f"  kept: {what}")
        requests = found.get("requests")
        if isinstance(requests, dict):  # --log-requests
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(requests.items())) or "none"
            print(f"  requests the guest made: {counts}")
        print("  " + "; ".join(_ended(found)))
    return 0 if found.get("clean") else 1


def _ended(found: dict[str, Any]) -> list[str]:
    """How a receipt's session ended, in words: what is not known is left out, never shown as None."""
    parts = [f"ended: {found.get('end_reason') or 'no reason recorded'}"]
    status = found.get("exit_status")
    parts.append(f"exit status {status}" if isinstance(status, int) else "no exit status")
    for key, what in (("teardown_s", "teardown"), ("check_s", "check")):
        if isinstance(found.get(key), int | float):
            parts.append(f"{what} {found[key]} s")
    return parts


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    from dispo import verify

    found = verify.scan(cfg)
    for what in found.orphans:
        print(what)
    if found.orphans:
        print(f"dispo: {len(found.orphans)} object(s) without a live owner; 'dispo gc' removes them", file=sys.stderr)
        return 1
    print(f"nothing of dispo's without a live owner ({len(found.live)} live session(s))")
    return 0


def cmd_disk(args: argparse.Namespace, cfg: Config) -> int:
    cmd = command(args.cmd, "dispo disk --image NAME -- CMD [ARG ...]")
    if not cmd and not sys.stdin.isatty():
        # Without CMD it waits for Ctrl-C, which only a terminal can send: elsewhere it would wait forever.
        raise InvalidInput("dispo disk needs a command, or a terminal to wait on for Ctrl-C",
                           hint="give one: dispo disk --image NAME -- CMD [ARG ...]")
    with open_session(cfg, image=args.image, name=args.name) as s:
        print(f"session {s.session_id}: disk {s.disk}", file=sys.stderr, flush=True)
        if not cmd:
            print(s.disk, flush=True)
            signal.pause()
            return 0
        return run_host_command(cmd, {"DISPO_DISK": str(s.disk), "DISPO_SESSION": s.session_id})
