"""`dispo open URL`: the URL in a disposable browser, the action a desktop's "open link" can be bound to
(contrib/dispo-open.desktop registers it for http and https; README "Open links in a disposable browser").

It is `dispo run PROFILE URL --open` (PROFILE: chromium unless --profile says otherwise): through dispod and its
warm pool when dispod runs, in-process otherwise, on the profile's display unless --display says otherwise.
With the web display, the viewer opens in the desktop's browser; when dispo *is* the desktop's browser for
http, that would come straight back here, so a `dispo open` started by another one refuses the viewer's URL
and says how to name a browser for it ($BROWSER).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from dispo.cli import run, viewerlink
from dispo.config import Config
from dispo.errors import InvalidInput
from dispo.profiles import DisplayMode
from dispo.runtime.request import check_url

DEFAULT_PROFILE = "chromium"
LOOP_ENV = viewerlink.LOOP_ENV  # set while `dispo open` opens its viewer: a nested `dispo open` is a loop


def register(sub: Any) -> None:
    p = sub.add_parser("open", help="open URL in a disposable browser (the desktop's http handler: "
                                    "contrib/dispo-open.desktop)")
    p.add_argument("url", metavar="URL", help="an http:// or https:// URL")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"the browser profile (default {DEFAULT_PROFILE})")
    p.add_argument("--display", choices=[m.value for m in DisplayMode], default=argparse.SUPPRESS,
                   help="where the browser shows (default: the profile's)")
    p.add_argument("--in-process", action="store_true", default=argparse.SUPPRESS,
                   help="run the session in this process even when dispod runs")
    p.set_defaults(func=cmd_open)


def cmd_open(args: argparse.Namespace, cfg: Config) -> int:
    if os.environ.get(LOOP_ENV):
        raise InvalidInput(f"dispo open was asked to open {args.url[:80]!r} while opening a viewer: dispo is the "
                           f"desktop's browser for http, so the viewer came back to it",
                           hint="name the browser for dispo's viewer: BROWSER=firefox (or chromium) in the "
                                "environment of the desktop entry")
    # Desktop environments pass what the user clicked: check it before anything starts.
    url = check_url(args.url)
    if not url.startswith(("http://", "https://")):
        raise InvalidInput(f"dispo open takes an http:// or https:// URL, not {url[:80]!r}")
    given = {k: v for k, v in vars(args).items() if k in ("display", "in_process")}
    ns = argparse.Namespace(cmd=[args.profile, url], open=True, **given)
    return run.cmd_run(ns, cfg)
