"""`dispo net ls`, `dispo net run`, `dispo net gc`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dispo.cli.common import command, print_table, run_host_command
from dispo.config import Config
from dispo.infra import journal
from dispo.infra.txn import transaction
from dispo.net import NetworkPolicy, attach_network, links, pool


def register(sub: Any) -> None:
    p = sub.add_parser("net", help="per-session networks: leases, links, firewall rules")
    nsub = p.add_subparsers(dest="net_command", metavar="ACTION", required=True)

    ls = nsub.add_parser("ls", help="list leased subnets and their sessions")
    ls.set_defaults(func=cmd_ls)

    runp = nsub.add_parser(
        "run", help="hold a session network (no VM) while a host command runs",
        description="Create a session network (lease, nftables rules, tap) in the current network namespace, "
                    "run CMD with $DISPO_TAP, $DISPO_GUEST_IP, $DISPO_GATEWAY, $DISPO_MAC, $DISPO_DNS, "
                    "$DISPO_KERNEL_ARGS (and $DISPO_GUEST_NETNS with the veth stand-in) set, then remove it "
                    "all. Without CMD: print the network and wait for Ctrl-C.")
    runp.add_argument("--policy", type=Path, help="egress policy file (TOML: internet, allow, deny)")
    runp.add_argument("--name", help="a name for the session (shown by 'dispo ls')")
    runp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    runp.set_defaults(func=cmd_run)

    gc = nsub.add_parser("gc", help="unwind dead sessions, then sweep network leftovers no journal knows")
    gc.set_defaults(func=cmd_gc)


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    alive = {info.session_id: info.alive for info in journal.scan(cfg.state_dir)}
    present = {link.name for link in links.dispo_links()}
    here = links.current_netns()
    rows = []
    for lease in pool.read_leases(cfg.state_dir):
        sid = lease.session_id or "?"
        state = "live" if alive.get(sid) else ("dead" if sid in alive else "orphan")
        link = links.link_name(sid)
        where = ("yes" if link in present else "no") if lease.netns == here else f"netns {lease.netns}"
        rows.append((str(lease.subnet), str(lease.guest.ip), str(lease.gateway), link, where, sid, state,
                     f"{time.time() - lease.created:.0f}s"))
    print_table(("SUBNET", "GUEST", "GATEWAY", "LINK", "PRESENT", "SESSION", "STATE", "AGE"), rows)
    return 0


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    cmd = command(args.cmd, "dispo net run -- CMD [ARG ...]")
    policy = NetworkPolicy.load(args.policy) if args.policy else None
    with transaction(cfg, purpose="net", name=args.name or "") as s:
        gn = attach_network(s, policy)
        print(f"session {s.session_id}: {gn.tap} gateway {gn.gateway} guest {gn.guest} mac {gn.mac}",
              file=sys.stderr, flush=True)
        env = {
            "DISPO_SESSION": s.session_id,
            "DISPO_TAP": gn.tap,
            "DISPO_MAC": gn.mac,
            "DISPO_GUEST_IP": str(gn.guest.ip),
            "DISPO_GUEST_CIDR": gn.guest.with_prefixlen,
            "DISPO_GATEWAY": str(gn.gateway),
            "DISPO_DNS": ",".join(str(d) for d in gn.dns),
            "DISPO_KERNEL_ARGS": " ".join(gn.kernel_args()),
            "DISPO_GUEST_NETNS": gn.standin_netns,
        }
        if not cmd:
            for k, v in env.items():
                print(f"{k}={v}", flush=True)
            signal.pause()
            return 0
        return run_host_command(cmd, env)


def cmd_gc(args: argparse.Namespace, cfg: Config) -> int:
    # The same as `dispo gc`, which also sweeps network orphans; kept under `net` where people look for it.
    from dispo.cli.sessions import cmd_gc as gc_all

    return gc_all(args, cfg)
