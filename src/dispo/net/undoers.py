"""Undo actions for the network objects a session's journal records. Each is idempotent.

Links and nftables rules live in a network namespace; the journal records its inode. An undo run from
another namespace refuses (the journal stays for a `dispo gc` run in the right one), unless that
namespace no longer exists, in which case the kernel has already removed everything that was in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dispo.errors import NetworkError
from dispo.infra.undo import undoer
from dispo.net import firewall, links, pool


def _in_recorded_netns(args: Mapping[str, str]) -> bool:
    """True: act here. False: the namespace is gone, nothing to do. Raises when it is elsewhere and alive."""
    recorded = int(args["netns"])
    if recorded == links.current_netns():
        return True
    where = links.netns_path(recorded)
    if where is None:
        return False
    # The hint is in the message too: a TeardownError shows the messages of its steps, not their hints.
    raise NetworkError(
        f"created in network namespace {recorded}, not in this one: run 'nsenter --net={where} dispo gc'",
        hint=f"run 'nsenter --net={where} dispo gc'",
    )


@undoer("net-lease")
def undo_lease(args: Mapping[str, str]) -> None:
    pool.release(Path(args["state_dir"]), args["session"])


@undoer("nft-session")
def undo_nft(args: Mapping[str, str]) -> None:
    if _in_recorded_netns(args):
        firewall.remove(Path(args["state_dir"]), args["session"])


@undoer("net-link")
def undo_link(args: Mapping[str, str]) -> None:
    if _in_recorded_netns(args):
        links.delete_link(args["name"])


@undoer("net-standin-netns")
def undo_netns(args: Mapping[str, str]) -> None:
    links.remove_netns(args["name"])
