"""`dispo takeover ID`: a person takes over a session that programs drive (dispod's, with automation). Every
automate token of the session is revoked and its automation connections closed; the new viewer link printed is
the person's, now the session's only driver (web/viewers.py ServiceViewers.take_over)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dispo.cli.common import dispod_client
from dispo.config import Config
from dispo.errors import ServiceError
from dispo.names import check_session_id


def register(sub: Any) -> None:
    p = sub.add_parser("takeover", help="take over a session programs drive: revoke its automate tokens, close "
                                        "their connections, print a viewer link for you")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print dispod's answer as JSON")
    p.set_defaults(func=cmd_takeover)


def cmd_takeover(args: argparse.Namespace, cfg: Config) -> int:
    check_session_id(args.id)
    client = dispod_client(cfg)
    if client is None:
        raise ServiceError("automation sessions live in dispod, which is not running",
                           hint="start it ('systemctl start dispod', or 'dispod' in a terminal)")
    with client:
        answer = client.takeover(args.id)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    revoked = answer.get("revoked") or []
    print(f"session {args.id}: revoked {len(revoked)} automate token(s), closed {answer.get('connections', 0)} "
          "automation connection(s); your viewer link:", file=sys.stderr)
    print(answer["url"], flush=True)
    return 0
