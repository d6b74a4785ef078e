"""`dispo volume ls|rm`: the volumes sessions keep on purpose (`dispo run chromium --keep NAME`,
storage/volumes.py). Everything else a session makes is thrown away; these stay until removed here."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dispo.cli.common import print_table
from dispo.config import Config
from dispo.names import format_size
from dispo.storage import volumes


def register(sub: Any) -> None:
    p = sub.add_parser("volume", help="volumes kept on purpose by 'dispo run PROFILE --keep NAME'")
    vsub = p.add_subparsers(dest="volume_command", metavar="ACTION", required=True)
    ls = vsub.add_parser("ls", help="list the kept volumes: size, space used, last change, in use")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(func=cmd_ls)
    rm = vsub.add_parser("rm", help="remove volumes (refused while a session uses one)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_rm)


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    found = volumes.list_volumes(cfg)
    if args.json:
        print(json.dumps({"volumes": [v.to_json() for v in found]}, indent=1))
        return 0
    if not found:
        print("no volumes (a session keeps one with 'dispo run PROFILE --keep NAME')")
        return 0
    rows = [(v.name, format_size(v.size), format_size(v.used),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(v.modified)), "yes" if v.in_use else "no")
            for v in found]
    print_table(("NAME", "SIZE", "USED", "CHANGED", "IN USE"), rows)
    return 0


def cmd_rm(args: argparse.Namespace, cfg: Config) -> int:
    for name in args.names:
        path = volumes.remove(cfg, name)
        print(f"removed volume {name} ({path})")
    return 0
