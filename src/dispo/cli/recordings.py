"""`dispo recording ls|rm`: the videos of recorded sessions (`dispo run PROFILE --record`, `"record": true`;
storage/recordings.py). Kept in the workspace until removed here or older than [recordings] max_age_h."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dispo.cli.common import print_table
from dispo.config import Config
from dispo.names import format_size
from dispo.storage import recordings


def register(sub: Any) -> None:
    p = sub.add_parser("recording", help="recordings of sessions run with --record (\"record\": true)")
    rsub = p.add_subparsers(dest="recording_command", metavar="ACTION", required=True)
    ls = rsub.add_parser("ls", help="list the recordings: session, size, when, sha256 (as in the receipt), path")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(func=cmd_ls)
    rm = rsub.add_parser("rm", help="remove recordings (the video, and the request log beside it)")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=cmd_rm)


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    recordings.sweep(cfg)  # those past [recordings] max_age_h go first
    found = recordings.list_recordings(cfg)
    if args.json:
        print(json.dumps({"recordings": [r.to_json() for r in found]}, indent=1))
        return 0
    if not found:
        print("no recordings (a session records its display with 'dispo run PROFILE --record')")
        return 0
    rows = [(r.session_id, format_size(r.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
             r.sha256[:16], str(r.video)) for r in found]
    print_table(("SESSION", "SIZE", "ENDED", "SHA256", "PATH"), rows)
    return 0


def cmd_rm(args: argparse.Namespace, cfg: Config) -> int:
    for sid in args.ids:
        path = recordings.remove(cfg, sid)
        print(f"removed recording {sid} ({path})")
    return 0
