"""nftables: one table owned by dispo (`inet dispo`), one set of chains per session, in nft's own language.

Shape of the table:
  base chains `prerouting` (filter, priority raw), `forward`, `input` (filter) and `postrouting` (nat), policy
  accept so that traffic that is not dispo's is never touched.
  `prerouting` drops any packet from a "dsp-*" link whose source address does not route back through that link
  (`fib saddr . iif oif missing`): strict reverse-path filtering that holds whatever the host's rp_filter says,
  and that runs before conntrack, so a forged packet can neither ride on nor disturb another flow's entry.
  The others look the interface name up in a verdict map and jump to the session's chain, then drop anything
  else on a "dsp-*" interface: a dispo link without rules, or whose map element or chain was emptied, is dropped.
  maps `fwd_from`, `fwd_to`, `in_from`, `nat_from`: "dsp-<id>" -> jump s-<id>-<role>.
  per session: s-<id>-out (guest -> forwarded), s-<id>-to (forwarded -> guest), s-<id>-in (guest -> host),
  s-<id>-nat (masquerade out of the upstream interface). Each filter chain checks addresses first (the guest's
  own source address out, its own destination address in; IPv4 only), before any `ct state` rule: conntrack
  must never vouch for a packet the guest forged.
A verdict map keeps the per-packet cost flat as sessions are added, and makes teardown exact: delete the
session's map elements and chains, nothing else.

Ownership: several dispo installations (state dirs) may share one network namespace and so this table. Every
session chain and map element carries a comment naming its session and state dir (`links.alias_for`, the same
mark as the link's alias, e.g. "dispo session 1a2b3c4d state /run/dispo"), so a sweep removes only what its
own state dir made and `nft list ruleset` says whose each chain is. Chains or elements without a mark (made by
hand, or by a dispo before this scheme) are nobody's: no sweep removes them.

Locks: each change is one nf_tables transaction (atomic: one netlink batch, applied in-process through
libnftables, libnft.py; what exists is asked over netlink, nfnl.py, so no `nft` process runs on a session's way
up or down). Changes to the table's shape (creating it, deleting
it when empty) and each session's add/remove happen under `table_lock`, an flock on the network namespace
itself, which every dispo in the namespace shares whatever its state dir; so "the table is empty, delete it"
cannot race another state dir's session being added. Callers hold their state dir's pool.net_lock outside it.
The session's rules go in before its link exists and come out after it is gone, so a guest is never unfiltered
while dispo runs; if someone removes the table meanwhile (`nft flush ruleset`), the kernel forwards the guest's
packets with no filter at all, which only ending the session fixes: see watch.py (`missing_rules`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispo.errors import NetworkError
from dispo.infra.proc import run
from dispo.net import libnft, nfnl
from dispo.net.links import LINK_PREFIX, link_name
from dispo.net.nfnl import NftReader
from dispo.net.policy import PRIVATE_RANGES, NetworkPolicy
from dispo.net.pool import net_lock

TABLE = "dispo"
FAMILY = "inet"
ROLES = ("out", "to", "in", "nat")
MAPS = {"out": "fwd_from", "to": "fwd_to", "in": "in_from", "nat": "nat_from"}
NFT_HINT = libnft.NFT_HINT
# A table lock held longer than this by someone else is an error, not a hang (any process in the namespace can
# flock it; see table_lock).
TABLE_LOCK_TIMEOUT_S = 60.0


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
        f"add chain {t} prerouting {{ type filter hook prerouting priority raw; policy accept; }}",
        f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
        f"add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}",
        f"flush chain {t} prerouting",
        # Strict reverse-path filtering for every dispo link, before conntrack (priority raw) sees the packet.
        f'add rule {t} prerouting iifname "{LINK_PREFIX}*" fib saddr . iif oif missing counter drop',
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


def _rule_counts(script: Sequence[str], chains: Iterable[str]) -> dict[str, int]:
    t = f"add rule {FAMILY} {TABLE} "
    return {c: sum(1 for line in script if line.startswith(f"{t}{c} ")) for c in chains}


#: The base chains: name -> (hook, number of rules). missing_rules checks the live table against this.
BASE_CHAINS: dict[str, tuple[str, int]] = {
    name: (hook, _rule_counts(skeleton(), [name])[name])
    for name, hook in (("prerouting", "prerouting"), ("forward", "forward"), ("input", "input"),
                       ("postrouting", "postrouting"))
}


@dataclass(frozen=True)
class SessionRules:
    session_id: str
    guest: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    pool: ipaddress.IPv4Network
    upstream: str
    dns: tuple[ipaddress.IPv4Address, ...]
    policy: NetworkPolicy
    owner: str = ""  # the owner mark (links.alias_for): comment on the session's chains and map elements

    def render(self) -> list[str]:
        t = f"{FAMILY} {TABLE}"
        sid = self.session_id
        ifname = link_name(sid)
        out, to, inp, nat = (chain_name(sid, r) for r in ROLES)
        mark = f' comment "{self.owner}"' if self.owner else ""
        lines: list[str] = []
        for chain in (out, to, inp, nat):
            # add + flush: a chain left by a crash under the same id is emptied before it is refilled.
            spec = f" {{{mark}; }}" if mark else ""
            lines += [f"add chain {t} {chain}{spec}", f"flush chain {t} {chain}"]
        p = self.policy
        # Guest -> anywhere but the host. Addresses first: before conntrack may call a packet "established", it
        # must come from the guest's own address (a guest can forge a packet that matches another flow's entry).
        lines += [
            f"add rule {t} {out} meta nfproto != ipv4 counter drop",
            f"add rule {t} {out} ip saddr != {self.guest.ip} counter drop",  # no spoofing
            f"add rule {t} {out} ct state invalid counter drop",
            f"add rule {t} {out} ct state established,related accept",
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
        # Anything -> guest: to the guest's own address only, and replies only; nobody opens a connection to a
        # guest through the host.
        lines += [
            f"add rule {t} {to} meta nfproto != ipv4 counter drop",
            f"add rule {t} {to} ip daddr != {self.guest.ip} counter drop",
            f"add rule {t} {to} ct state established,related accept",
            f"add rule {t} {to} counter drop",
        ]
        # Guest -> the host itself: replies to the host's own connections (e.g. SSH from dispo) and ping
        # of its own gateway; no host service, no other address of the host. Source first, here too.
        lines += [
            f"add rule {t} {inp} meta nfproto != ipv4 counter drop",
            f"add rule {t} {inp} ip saddr != {self.guest.ip} counter drop",
            f"add rule {t} {inp} ct state established,related accept",
            f"add rule {t} {inp} ip daddr {self.gateway} icmp type echo-request accept",
            f"add rule {t} {inp} counter drop",
        ]
        lines.append(f'add rule {t} {nat} oifname "{self.upstream}" masquerade')
        for role in ROLES:
            lines.append(f'add element {t} {MAPS[role]} {{ "{ifname}"{mark} : jump {chain_name(sid, role)} }}')
        return lines

    def rule_counts(self) -> dict[str, int]:
        """role -> number of rules in the session's chain of that role (journaled; checked by missing_rules)."""
        counts = _rule_counts(self.render(), [chain_name(self.session_id, r) for r in ROLES])
        return {r: counts[chain_name(self.session_id, r)] for r in ROLES}


def format_counts(counts: dict[str, int]) -> str:
    return ",".join(f"{role}={n}" for role, n in counts.items())


def parse_counts(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        role, _, n = item.partition("=")
        if role in ROLES and n.isdigit():
            out[role] = int(n)
    return out


_held = threading.local()  # inodes of the network namespaces whose table lock this thread holds


@contextlib.contextmanager
def table_lock() -> Iterator[None]:
    """Exclusive lock on dispo's table in this network namespace, for every dispo whatever its state dir.

    It is an flock on the namespace itself (/proc/thread-self/ns/net): one lock per namespace, no file to create
    or leave behind, gone with the namespace. Re-entrant within a thread. Any process in the namespace can open
    that file, so a lock held past TABLE_LOCK_TIMEOUT_S is reported instead of waited on forever."""
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    key = os.fstat(fd).st_ino
    held: set[int] = _held.__dict__.setdefault("netns", set())
    if key in held:
        os.close(fd)
        yield
        return
    try:
        deadline = time.monotonic() + TABLE_LOCK_TIMEOUT_S
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise NetworkError(f"dispo's nftables table in network namespace {key} stayed locked for "
                                   f"{TABLE_LOCK_TIMEOUT_S:.0f} s",
                                   hint="find the process holding it with 'lsof /proc/*/ns/net' and end it")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)


def nft(script: Sequence[str]) -> None:
    """Apply a list of nft commands as one atomic transaction (one nf_tables batch, in-process: libnft.py)."""
    libnft.apply(script)


def chains() -> set[str] | None:
    """Names of the chains in dispo's table (a cheap listing: no rules), or None when there is no table."""
    proc = run(["nft", "-j", "list", "chains", FAMILY], check=False, hint=NFT_HINT)
    if proc.returncode != 0:
        raise NetworkError(f"cannot list nftables chains: {proc.stderr.strip()}", hint=NFT_HINT)
    names = {str(o["chain"]["name"]) for o in json.loads(proc.stdout).get("nftables", [])
             if "chain" in o and o["chain"].get("table") == TABLE}
    return names or None


def chain_comments() -> dict[str, str]:
    """Chain name -> comment for the chains of dispo's table that have one. (`nft -j` 1.0.6 leaves chain
    comments out, so this reads the text listing of chains, which has no rules and stays small.)"""
    proc = run(["nft", "list", "chains", FAMILY], check=False, hint=NFT_HINT)
    if proc.returncode != 0:
        raise NetworkError(f"cannot list nftables chains: {proc.stderr.strip()}", hint=NFT_HINT)
    return parse_chain_comments(proc.stdout)


def parse_chain_comments(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    in_table, chain = False, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("table "):
            in_table, chain = line == f"table {FAMILY} {TABLE} {{", ""
        elif in_table and line.startswith("chain ") and line.endswith("{"):
            chain = line.removeprefix("chain ").removesuffix("{").strip()
        elif in_table and chain and line.startswith('comment "') and line.endswith('"'):
            out[chain] = line.removeprefix('comment "')[:-1]
        elif line == "}":
            chain = ""
    return out


def install(state_dir: Path, rules: SessionRules) -> None:
    with net_lock(state_dir), table_lock():
        # Rewriting the base chains makes nft load the whole table; only do it when they are missing.
        try:
            with NftReader(close_behind=True) as reader:
                base = all(reader.chain(TABLE, name) is not None for name in BASE_CHAINS)
        except OSError as e:
            raise NetworkError(f"cannot list nftables chains: {e.strerror or e}", hint=NFT_HINT) from None
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
class Element:
    target: str  # the chain it jumps to ("" for another verdict)
    comment: str


@dataclass(frozen=True)
class TableState:
    chains: frozenset[str]
    elements: dict[str, dict[str, Element]]  # map name -> interface name -> element
    rules: dict[str, int] = field(default_factory=dict)  # chain -> number of rules
    hooks: dict[str, str] = field(default_factory=dict)  # base chain -> hook

    def session_ids(self) -> set[str]:
        ids = {c.split("-")[1] for c in self.chains if c.startswith("s-") and c.count("-") == 2}
        for names in self.elements.values():
            ids |= {n.removeprefix(LINK_PREFIX) for n in names if n.startswith(LINK_PREFIX)}
        return ids

    def marks(self, session_id: str, chain_comments: dict[str, str]) -> set[str]:
        """Owner marks found on the session's map elements and chains."""
        ifname = link_name(session_id)
        found = {m[ifname].comment for m in self.elements.values() if ifname in m and m[ifname].comment}
        found |= {chain_comments[c] for c in (chain_name(session_id, r) for r in ROLES) if c in chain_comments}
        return found


def parse_table(objects: list[dict[str, Any]]) -> TableState:
    chains: set[str] = set()
    elements: dict[str, dict[str, Element]] = {}
    rules: dict[str, int] = {}
    hooks: dict[str, str] = {}
    for obj in objects:
        if "chain" in obj:
            name = str(obj["chain"]["name"])
            chains.add(name)
            rules.setdefault(name, 0)
            if "hook" in obj["chain"]:
                hooks[name] = str(obj["chain"]["hook"])
        elif "rule" in obj:
            name = str(obj["rule"]["chain"])
            rules[name] = rules.get(name, 0) + 1
        elif "map" in obj:
            found: dict[str, Element] = {}
            for raw_key, verdict in obj["map"].get("elem", []):
                key, comment = raw_key, ""
                if isinstance(raw_key, dict) and "elem" in raw_key:  # an element with a comment
                    key, comment = raw_key["elem"]["val"], str(raw_key["elem"].get("comment", ""))
                target = ""
                if isinstance(verdict, dict):
                    jump = verdict.get("jump") or verdict.get("goto")
                    if isinstance(jump, dict):
                        target = str(jump.get("target", ""))
                found[str(key)] = Element(target, comment)
            elements[str(obj["map"]["name"])] = found
    return TableState(frozenset(chains), elements, rules, hooks)


def table_state() -> TableState | None:
    objects = table_json()
    return None if objects is None else parse_table(objects)


def remove(state_dir: Path, session_id: str) -> None:
    """Delete exactly this session's map elements and chains (idempotent); drop the table when it is empty.
    One chain listing and one nf_tables batch over netlink, in-process."""
    with net_lock(state_dir), table_lock():
        try:
            with NftReader(close_behind=True) as reader:
                present = reader.chain_names(TABLE)
                if present is None:
                    return
                mine = [chain_name(session_id, r) for r in ROLES if chain_name(session_id, r) in present]
                others = {c for c in present if c.startswith("s-") and c not in mine}
                if not others:
                    # The last session of any state dir leaves: nothing of dispo stays.
                    reader.commit([nfnl.del_table(TABLE)])
                    return
                if not mine:
                    return
                # A session's elements and chains are added in one transaction and deleted in one, so where
                # its chains are, its elements are (unless someone edited the table by hand: then look at
                # everything, below).
                ifname = link_name(session_id)
                with contextlib.suppress(OSError):
                    reader.commit([nfnl.del_map_element(TABLE, MAPS[r], ifname) for r in ROLES
                                   if chain_name(session_id, r) in present]
                                  + [nfnl.del_chain(TABLE, c) for c in mine])
                    return
        except OSError as e:
            raise NetworkError(f"cannot remove the session's nftables rules: {e.strerror or e}",
                               hint=NFT_HINT) from None
        state = table_state()
        if state is None:
            return
        t = f"{FAMILY} {TABLE}"
        script = [f'delete element {t} {m} {{ "{ifname}" }}' for m, names in state.elements.items()
                  if ifname in names]
        nft(script + [f"delete chain {t} {c}" for c in mine if c in state.chains])


def remove_if_empty(state_dir: Path) -> bool:
    """Drop the table when no session of any state dir has anything in it. True if it was removed."""
    with net_lock(state_dir), table_lock():
        state = table_state()
        if state is None or state.session_ids():
            return False
        nft([f"delete table {FAMILY} {TABLE}"])
        return True
