"""`dispo pool ls|fill|drain`: dispod's warm pool (runtime/pool.py). The pool lives in dispod, so these talk
to it; without a running dispod they say how to start one."""

from __future__ import annotations

import argparse
from typing import Any

from dispo.cli.common import dispod_client, print_table
from dispo.config import Config
from dispo.errors import ServiceError


def register(sub: Any) -> None:
    p = sub.add_parser("pool", help="dispod's warm pool: guests restored from templates, waiting for a session")
    psub = p.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    ls = psub.add_parser("ls", help="per profile or image: target, ready and starting guests, memory held")
    ls.set_defaults(func=cmd_ls)
    fill = psub.add_parser("fill", help="keep COUNT guests of NAME's template ready (NAME: a profile or image)")
    fill.add_argument("name", metavar="NAME")
    fill.add_argument("--count", type=int, default=1, help="how many to keep waiting (default 1)")
    fill.set_defaults(func=cmd_fill)
    drain = psub.add_parser("drain", help="stop NAME's waiting guests and keep none")
    drain.add_argument("name", metavar="NAME")
    drain.set_defaults(func=cmd_drain)


def _client(cfg: Config) -> Any:
    client = dispod_client(cfg)
    if client is None:
        raise ServiceError("the warm pool lives in dispod, which is not running",
                           hint="start it ('systemctl start dispod', or 'dispod' in a terminal)")
    return client


def _show(pool: dict[str, Any]) -> None:
    rows = [(s["name"], str(s["target"]), str(s["ready"]), str(s["starting"]), s.get("template") or "-",
             f"{s.get('memory_mib', 0)} MiB", s.get("last_error") or "") for s in pool["slots"]]
    print_table(("NAME", "TARGET", "READY", "STARTING", "TEMPLATE", "MEMORY", "LAST ERROR"), rows)
    print(f"memory held: {pool['used_mib']} MiB of a {pool['budget_mib']} MiB budget")


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    _show(_client(cfg).pool())
    return 0


def cmd_fill(args: argparse.Namespace, cfg: Config) -> int:
    _show(_client(cfg).pool_fill(args.name, args.count))
    return 0


def cmd_drain(args: argparse.Namespace, cfg: Config) -> int:
    _show(_client(cfg).pool_drain(args.name))
    return 0
