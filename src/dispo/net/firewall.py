"""nftables: one table owned by dispo (`inet dispo`), one set of chains per session, through the `nft` CLI.

Shape of the table:
  base chains `forward`, `input` (filter) and `postrouting` (nat), policy accept so that traffic that is
  not dispo's is never touched; each looks the interface name up in a verdict map and jumps to the
  session's chain, and drops anything else on a "dsp-*" interface (a dispo link without rules fails closed).
  maps `fwd_from`, `fwd_to`, `in_from`, `nat_from`: "dsp-<id>" -> jump s-<id>-<role>.
  per session: s-<id>-out (guest -> forwarded), s-<id>-to (forwarded -> guest), s-<id>-in (guest -> host),
  s-<id>-nat (masquerade out of the upstream interface).
A verdict map keeps the per-packet cost flat as sessions are added, and makes teardown exact: delete the
session's map elements and chains, nothing else. Each change is one `nft -f -` transaction (atomic), run
under the pool lock so that removing the empty table cannot race another session's creation. The session's
rules go in before its link exists and come out after it is gone, so a guest is never unfiltered.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispo.errors import CommandError, NetworkError
from dispo.net.links import LINK_PREFIX, link_name
from dispo.net.policy import PRIVATE_RANGES, NetworkPolicy
from dispo.net.pool import net_lock
from dispo.proc import run

TABLE = "dispo"
FAMILY = "inet"
ROLES = ("out", "to", "in", "nat")
MAPS = {"out": "fwd_from", "to": "fwd_to", "in": "in_from", "nat": "nat_from"}
NFT_HINT = "install nftables (apt install nftables) and run dispo as root"


def chain_name(session_id: str, role: str) -> str:
    return f"s-{session_id}-{role}"


def _set(items: Iterable[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def skeleton() -> list[str]:
    """Table, maps and base chains. `add` is a no-op for what exists; the base chains are flushed and
    refilled so that the result is the same however many times it runs."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"add table {t}"]
    for m in MAPS.values():
        lines.append(f"add map {t} {m} {{ type ifname : verdict; }}")
    lines += [
        f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
        f"add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}",
        f"flush chain {t} forward",
        f"add rule {t} forward iifname vmap @{MAPS['out']}",
        f"add rule {t} forward oifname vmap @{MAPS['to']}",
        f'add rule {t} forward iifname "{LINK_PREFIX}*" counter drop',
        f'add rule {t} forward oifname "{LINK_PREFIX}*" counter drop',
        f"flush chain {t} input",
        f"add rule {t} input iifname vmap @{MAPS['in']}",
        f'add rule {t} input iifname "{LINK_PREFIX}*" counter drop',
        f"flush chain {t} postrouting",
        f"add rule {t} postrouting iifname vmap @{MAPS['nat']}",
    ]
    return lines


@dataclass(frozen=True)
class SessionRules:
    session_id: str
    guest: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    pool: ipaddress.IPv4Network
    upstream: str
    dns: tuple[ipaddress.IPv4Address, ...]
    policy: NetworkPolicy

    def render(self) -> list[str]:
        t = f"{FAMILY} {TABLE}"
        sid = self.session_id
        ifname = link_name(sid)
        out, to, inp, nat = (chain_name(sid, r) for r in ROLES)
        lines: list[str] = []
        for chain in (out, to, inp, nat):
            # add + flush: a chain left by a crash under the same id is emptied before it is refilled.
            lines += [f"add chain {t} {chain}", f"flush chain {t} {chain}"]
        p = self.policy
        # Guest -> anywhere but the host.
        lines += [
            f"add rule {t} {out} ct state invalid counter drop",
            f"add rule {t} {out} ct state established,related accept",
            f"add rule {t} {out} meta nfproto != ipv4 counter drop",
            f"add rule {t} {out} ip saddr != {self.guest.ip} counter drop",  # no spoofing
            f"add rule {t} {out} ip daddr {self.pool} counter drop",  # other sessions, always
        ]
        if p.deny:
            lines.append(f"add rule {t} {out} ip daddr {_set(p.deny)} counter drop")
        if self.dns:
            lines.append(f"add rule {t} {out} ip daddr {_set(self.dns)} meta l4proto {{ tcp, udp }} "
                         f"th dport 53 accept")
        if p.allow:
            lines.append(f"add rule {t} {out} ip daddr {_set(p.allow)} accept")
        lines.append(f"add rule {t} {out} ip daddr {_set(PRIVATE_RANGES)} counter drop")
        if p.internet:
            lines.append(f'add rule {t} {out} oifname "{self.upstream}" accept')
        lines.append(f"add rule {t} {out} counter drop")
        # Anything -> guest: replies only; nobody opens a connection to a guest through the host.
        lines += [
            f"add rule {t} {to} ct state established,related accept",
            f"add rule {t} {to} counter drop",
        ]
        # Guest -> the host itself: replies to the host's own connections (e.g. SSH from dispo) and ping
        # of its own gateway; no host service, no other address of the host.
        lines += [
            f"add rule {t} {inp} ct state established,related accept",
            f"add rule {t} {inp} ip saddr {self.guest.ip} ip daddr {self.gateway} icmp type echo-request accept",
            f"add rule {t} {inp} counter drop",
        ]
        lines.append(f'add rule {t} {nat} oifname "{self.upstream}" masquerade')
        for role in ROLES:
            lines.append(f'add element {t} {MAPS[role]} {{ "{ifname}" : jump {chain_name(sid, role)} }}')
        return lines


def nft(script: Sequence[str]) -> None:
    """Apply a list of nft commands as one atomic transaction."""
    text = "\n".join(script) + "\n"
    try:
        run(["nft", "-f", "-"], input=text.encode(), hint=NFT_HINT)
    except CommandError as e:
        raise NetworkError(f"nftables refused dispo's rules: {e.message}", hint=NFT_HINT) from None


def chains() -> set[str] | None:
    """Names of the chains in dispo's table (a cheap listing: no rules), or None when there is no table."""
    proc = run(["nft", "-j", "list", "chains", FAMILY], check=False, hint=NFT_HINT)
    if proc.returncode != 0:
        raise NetworkError(f"cannot list nftables chains: {proc.stderr.strip()}", hint=NFT_HINT)
    names = {str(o["chain"]["name"]) for o in json.loads(proc.stdout).get("nftables", [])
             if "chain" in o and o["chain"].get("table") == TABLE}
    return names or None


def install(state_dir: Path, rules: SessionRules) -> None:
    with net_lock(state_dir):
        # Rewriting the base chains makes nft load the whole table; only do it when they are missing.
        present = chains() or set()
        base = {"forward", "input", "postrouting"} <= present
        nft((skeleton() if not base else []) + rules.render())


def table_json() -> list[dict[str, Any]] | None:
    """The objects of dispo's table, or None when there is no such table."""
    proc = run(["nft", "-j", "list", "table", FAMILY, TABLE], check=False, hint=NFT_HINT)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NetworkError(f"cannot list nftables table {FAMILY} {TABLE}: {proc.stderr.strip()}", hint=NFT_HINT)
    objects: list[dict[str, Any]] = json.loads(proc.stdout).get("nftables", [])
    return objects


@dataclass(frozen=True)
class TableState:
    chains: frozenset[str]
    elements: dict[str, frozenset[str]]  # map name -> interface names

    def session_ids(self) -> set[str]:
        ids = {c.split("-")[1] for c in self.chains if c.startswith("s-") and c.count("-") == 2}
        for names in self.elements.values():
            ids |= {n.removeprefix(LINK_PREFIX) for n in names if n.startswith(LINK_PREFIX)}
        return ids


def table_state() -> TableState | None:
    objects = table_json()
    if objects is None:
        return None
    chains: set[str] = set()
    elements: dict[str, frozenset[str]] = {}
    for obj in objects:
        if "chain" in obj:
            chains.add(str(obj["chain"]["name"]))
        elif "map" in obj:
            elems = obj["map"].get("elem", [])
            elements[str(obj["map"]["name"])] = frozenset(str(e[0]) for e in elems)
    return TableState(frozenset(chains), elements)


def remove(state_dir: Path, session_id: str) -> None:
    """Delete exactly this session's map elements and chains (idempotent); drop the table when it is empty."""
    with net_lock(state_dir):
        present = chains()
        if present is None:
            return
        t = f"{FAMILY} {TABLE}"
        mine = [chain_name(session_id, r) for r in ROLES if chain_name(session_id, r) in present]
        others = {c for c in present if c.startswith("s-") and c not in mine}
        if not others:
            nft([f"delete table {t}"])  # the last session leaves: nothing of dispo stays
            return
        if not mine:
            return
        # A session's elements and chains are added in one transaction and deleted in one, so where its
        # chains are, its elements are (unless someone edited the table by hand: then look at everything).
        ifname = link_name(session_id)
        fast = [f'delete element {t} {MAPS[r]} {{ "{ifname}" }}' for r in ROLES
                if chain_name(session_id, r) in present]
        try:
            nft(fast + [f"delete chain {t} {c}" for c in mine])
        except NetworkError:
            state = table_state()
            if state is None:
                return
            script = [f'delete element {t} {m} {{ "{ifname}" }}' for m, names in state.elements.items()
                      if ifname in names]
            nft(script + [f"delete chain {t} {c}" for c in mine if c in state.chains])


def remove_if_empty(state_dir: Path) -> bool:
    """Drop the table when no session has anything in it. True if it was removed."""
    with net_lock(state_dir):
        state = table_state()
        if state is None or state.session_ids():
            return False
        nft([f"delete table {FAMILY} {TABLE}"])
        return True
