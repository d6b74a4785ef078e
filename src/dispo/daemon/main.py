"""`dispod`: parse options, take the state dir, serve until SIGTERM/SIGINT/SIGHUP, stop cleanly.

The only place of the service that prints: one line per thing an operator should know (what the start
reclaimed, where it listens, the dashboard URL, sessions starting and ending), errors as one line with a hint.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from dispo import __version__, config
from dispo.daemon.dispod import Dispod, Options, gateway_token, options_from
from dispo.errors import Conflict, DispoError, InvalidInput
from dispo.infra.private import write_private
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
    p.add_argument("--ray", metavar="HOST:PORT",
                   help="also join the Ray cluster whose head is at HOST:PORT as a node (needs --listen and the "
                   "cluster secret, [cluster] secret_file; pip install dispo[cluster]); see docs/scale-out.md")
    p.add_argument("--gateway", action="store_true",
                   help="with --ray: serve the cluster's gateway (one API for every node) instead of a node")
    p.add_argument("--node", metavar="NAME", help="this node's name in session ids NODE~ID (default: [cluster] "
                   "node, else the host name)")
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


def _cluster_name(cfg: config.Config, given: str | None) -> str:
    name = given or cfg.cluster.node or socket.gethostname().split(".")[0].lower()
    if not config.NODE_NAME.fullmatch(name):
        raise InvalidInput(f"node name {name!r} is not allowed in session ids NODE~ID",
                           hint="give --node NAME (or [cluster] node): up to 32 of a-z, 0-9 and '-'")
    return name


def _node_options(cfg: config.Config, options: Options, args: argparse.Namespace) -> Options:
    if not options.listen:
        raise InvalidInput("--ray needs --listen HOST:PORT: the gateway reaches the node's dispod there",
                           hint="listen on the node's cluster address, e.g. --listen 10.0.0.2:8686")
    from dispo.cluster import secret
    from dispo.cluster.node import split_address

    split_address(args.ray)
    return dataclasses.replace(options, ray=args.ray, node=_cluster_name(cfg, args.node),
                               cluster_secret=secret.read(cfg.cluster.secret_file))


def _gateway(cfg: config.Config, args: argparse.Namespace) -> int:
    """dispod --gateway --ray ADDRESS --listen HOST:PORT (dispo/cluster/gateway.py)."""
    if not args.ray or not (args.listen or cfg.service.listen):
        raise InvalidInput("--gateway needs --ray HOST:PORT (the Ray head) and --listen HOST:PORT (where clients "
                           "reach it)", hint="e.g. dispod --gateway --ray 10.0.0.1:6379 --listen 10.0.0.1:8686")
    from dispo.cluster import gateway, secret
    from dispo.cluster.node import split_address
    from dispo.servicepaths import ServicePaths

    split_address(args.ray)
    cluster_secret = secret.read(cfg.cluster.secret_file, make=True)
    # A state dir of its own: a node's dispod may run on the same host (the head), with its own lock and token.
    gw_cfg = dataclasses.replace(cfg, state_dir=cfg.state_dir / "gateway")
    options = dataclasses.replace(options_from(gw_cfg, listen=args.listen), new_token=args.new_token)
    paths = ServicePaths(gw_cfg.state_dir)
    gw_cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"another gateway already serves the state dir {gw_cfg.state_dir}",
                           hint="stop it first, or give this one another state_dir") from None
        token = gateway_token(paths, new=args.new_token, say=say)
        gw = gateway.Gateway(args.ray, cluster_secret, say)
        stop = asyncio.Event()

        async def run() -> None:
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, stop.set)
            await gateway.serve(gw, paths, token, options.listen, options.limits, stop=stop, say=say,
                                serving=serving)

        def serving(url: str) -> None:  # as a node's dispod: the dashboard's link, root-only, and said
            write_private(paths.url, url + "\n")
            say(f"dashboard: {url}")

        try:
            asyncio.run(run())
        finally:
            paths.url.unlink(missing_ok=True)
        say("stopped")
        return 0
    finally:
        os.close(lock)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="dispod: %(levelname)s: %(message)s", stream=sys.stderr)
    dispod: Dispod | None = None
    try:
        cfg = config.load(args.config)
        if args.gateway:
            return _gateway(cfg, args)
        options = options_from(cfg, listen=args.listen, max_sessions=args.max_sessions,
                               machinery=load_machinery(args.machinery), new_token=args.new_token)
        if args.ray:
            options = _node_options(cfg, options, args)
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
