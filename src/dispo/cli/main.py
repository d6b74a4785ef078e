"""`dispo` entry point: parse, load config, run a command, map errors to one line and an exit code."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from dispo import __version__, config, gc
from dispo.cli import (
    demo,
    firecracker,
    images,
    net,
    opener,
    pool,
    recordings,
    run,
    sessions,
    takeover,
    templates,
    volumes,
)
from dispo.cli.common import Terminated
from dispo.errors import DispoError, InvalidInput
from dispo.infra import progress

EXIT_ERROR = 1

COMMAND_MODULES = (images, templates, pool, sessions, net, run, takeover, opener, volumes, recordings, firecracker,
                   demo)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


# Commands that look rather than act: they show dead sessions instead of sweeping them first.
OBSERVERS = frozenset({"ls", "gc", "verify", "receipt", "pool", "takeover"})


def _sweep_dead(cfg: config.Config) -> None:
    """Every acting command first undoes what sessions of dead owners left (a `dispo run` or dispod killed
    with -9: their VMMs died with them, their taps, rules, leases and disks are still recorded)."""
    try:
        report = gc.reclaim_journals(cfg)  # with a disposal receipt for each reclaimed session
    except (OSError, DispoError) as e:  # not root, no state dir yet: nothing this command can sweep
        logging.getLogger(__name__).debug("sweep of dead sessions skipped: %s", e)
        return
    if report.reclaimed:
        print(f"dispo: reclaimed {len(report.reclaimed)} session(s) whose owner died: {', '.join(report.reclaimed)}",
              file=sys.stderr)
    if report.failed:
        print(f"dispo: {len(report.failed)} dead session(s) could not be reclaimed from here; see 'dispo gc'",
              file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispo", description="Disposable sessions inside microVMs.")
    p.add_argument("--version", action="version", version=f"dispo {__version__}")
    p.add_argument("--config", type=Path, help="config file (default: $DISPO_CONFIG or /etc/dispo/dispo.toml)")
    p.add_argument("--dispod", metavar="URL", help="talk to the dispod (or cluster gateway) at URL, e.g. "
                   "http://10.0.0.1:8686, with its token from $DISPO_TOKEN or [client] token_file (default: "
                   "[client] dispod, else this host's dispod socket)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (-vv: every command run)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="dispo: %(levelname)s: %(message)s", stream=sys.stderr)
    progress.show_on(sys.stderr)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so a killed `dispo` still tears its session down.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        cfg = config.load(args.config)
        if args.dispod:
            if config.CHECKS["client.dispod"](args.dispod, cfg) is not None:
                raise InvalidInput(f"--dispod {args.dispod!r} is not a base URL", hint="e.g. --dispod http://10.0.0.1:8686")
            cfg = dataclasses.replace(cfg, client=dataclasses.replace(cfg.client, dispod=args.dispod))
        if args.command not in OBSERVERS and (args.command, getattr(args, "net_command", None)) != ("net", "ls"):
            _sweep_dead(cfg)
        rc: int = args.func(args, cfg)
        return rc
    except DispoError as e:
        print(f"dispo: error: {e.one_line()}", file=sys.stderr)
        if args.verbose >= 2:
            raise
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("dispo: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"dispo: stopped by {e}", file=sys.stderr)
        return 128 + e.signum


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
