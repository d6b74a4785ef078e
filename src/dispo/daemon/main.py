"""`dispod`: parse options, take the state dir, serve until SIGTERM/SIGINT/SIGHUP, stop cleanly.

The only place of the service that prints: one line per thing an operator should know (what the start
reclaimed, where it listens, the dashboard URL, sessions starting and ending), errors as one line with a hint.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dispo import __version__, config
from dispo.daemon.dispod import Dispod, options_from
from dispo.errors import DispoError, InvalidInput
from dispo.runtime.machinery import REAL, Machinery

EXIT_ERROR = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispod", description="dispo's service: many disposable sessions at once, "
                                "a REST API on a root-only unix socket (and TCP with --listen), a web dashboard.")
    p.add_argument("--version", action="version", version=f"dispod {__version__}")
    p.add_argument("--config", type=Path, help="config file (default: $DISPO_CONFIG or /etc/dispo/dispo.toml)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also listen on TCP (bearer token; off by default), e.g. 127.0.0.1:8686")
    p.add_argument("--max-sessions", type=int, metavar="N", help="live sessions at once (default: [service] "
                   "max_sessions, 4)")
    p.add_argument("--new-token", action="store_true",
                   help="make a new access token (the one kept in the state dir's dispod.token stops working: "
                   "dashboards and clients that have it get 401)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (-vv: every command run)")
    # For tests: a callable returning the Machinery to use instead of the real one (tests.fakes:machinery).
    p.add_argument("--machinery", metavar="MODULE:ATTR", help=argparse.SUPPRESS)
    return p


def load_machinery(spec: str | None) -> Machinery:
    if not spec:
        return REAL
    module, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise InvalidInput(f"--machinery {spec!r}: {e}", hint="give MODULE:ATTR, e.g. tests.fakes:machinery") from None
    machinery = found if isinstance(found, Machinery) else found() if callable(found) else None
    if not isinstance(machinery, Machinery):
        raise InvalidInput(f"--machinery {spec!r} is not a Machinery (or a callable returning one)")
    return machinery


def say(line: str) -> None:
    print(f"dispod: {line}", flush=True)


async def _serve(dispod: Dispod) -> list[str]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return await dispod.serve(stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="dispod: %(levelname)s: %(message)s", stream=sys.stderr)
    dispod: Dispod | None = None
    try:
        cfg = config.load(args.config)
        options = options_from(cfg, listen=args.listen, max_sessions=args.max_sessions,
                               machinery=load_machinery(args.machinery), new_token=args.new_token)
        dispod = Dispod(cfg, options, say)
        dispod.open()
        left = asyncio.run(_serve(dispod))
        say("stopped" + (f"; {len(left)} session(s) left for 'dispo gc'" if left else ""))
        return 0
    except DispoError as e:
        print(f"dispod: error: {e.one_line()}", file=sys.stderr, flush=True)
        if args.verbose >= 2:
            raise
        return EXIT_ERROR
    finally:
        if dispod is not None:
            dispod.close()


if __name__ == "__main__":
    sys.exit(main())
