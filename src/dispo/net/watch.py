"""Is a live session's firewall still there? `missing_rules(state_dir, session_id)` answers, cheaply enough to
ask every second or two for every session.

Why it matters: the session's filter is nftables state that anyone with root can remove (`nft flush ruleset`,
which is also what `systemctl restart nftables` and many firewall managers do). Without the `inet dispo` table
the kernel forwards the guest's packets with no filter at all (IPv4 forwarding is on, other tables accept), so
the session is then open to the host's networks and services. There is no way to fail closed in the kernel
once the table is gone; the owner has to notice and end the session (or re-install the rules, which would hide
that someone tampered with them). Partial damage mostly fails closed by itself: a session whose map element is
deleted or whose chain is emptied falls through to the base chains' "dsp-*" drop. The owner is told anyway.

The owner calls it from its supervision loop, in the session's network namespace (the one attach_network ran
in):

    missing = missing_rules(cfg.state_dir, session_id)
    if missing:
        live.stop(rules_gone_reason(missing))

Cost: a few small netlink questions to nf_tables in-process (nfnl.py: the table, the 4 base and 4 session
chains with their rule counts, the 4 maps) and one read of the session's journal, about a millisecond whatever
the number of sessions (bench/net.py reports it); no process is started.
"""

from __future__ import annotations

from pathlib import Path

from dispo.errors import JournalError, NetworkError
from dispo.infra import journal
from dispo.net import firewall, links
from dispo.net.nfnl import NftReader

__all__ = ["RULES_GONE", "leftover_rules", "missing_rules", "rules_gone_reason"]

RULES_GONE = "firewall rules of the session disappeared (nft flush?): ended to fail closed"


def _expected_counts(state_dir: Path, session_id: str) -> dict[str, int]:
    """The rule counts attach_network journaled with "nft-session" ({} when unknown: then any rule will do)."""
    try:
        j = journal.Journal.load(journal.sessions_root(state_dir) / session_id)
    except (JournalError, KeyError, ValueError, TypeError):
        return {}
    for entry in j.entries:
        if entry.kind == "nft-session" and entry.args.get("session") == session_id:
            return firewall.parse_counts(entry.args.get("rules", ""))
    return {}


def missing_rules(state_dir: Path, session_id: str) -> list[str]:
    """What of the session's firewall is missing or altered in this network namespace; [] = intact.

    Checks the table, the base chains (hook and number of rules), the session's four map elements (and where
    they jump) and its four chains (number of rules, against what was journaled at creation). Each entry is a
    short phrase, e.g. "table inet dispo (nothing of dispo's firewall is left)", "map element fwd_from
    dsp-1a2b3c4d", "rules of chain s-1a2b3c4d-out (0 of 9)". A session id with no rules at all gets a
    non-empty answer too. Thread-safe (a netlink socket per call). Raises NetworkError (or PermissionProblem)
    when nf_tables cannot be asked at all: treat that as missing, the filter cannot be shown to be there."""
    table = firewall.TABLE
    try:
        with NftReader() as nft:
            if not nft.table_exists(table):
                return [f"table {firewall.FAMILY} {table} (nothing of dispo's firewall is left)"]
            missing: list[str] = []
            for name, (hook, count) in firewall.BASE_CHAINS.items():
                chain = nft.chain(table, name)
                if chain is None:
                    missing.append(f"base chain {name}")
                elif chain.hook != hook:
                    missing.append(f"base chain {name} (not on the {hook} hook)")
                elif (have := nft.rule_count(table, name)) != count:
                    missing.append(f"rules of base chain {name} ({have} of {count})")
            expected = _expected_counts(state_dir, session_id)
            ifname = links.link_name(session_id)
            for role in firewall.ROLES:
                name = firewall.chain_name(session_id, role)
                mapname = firewall.MAPS[role]
                target = nft.map_jump(table, mapname, ifname)
                if target is None:
                    missing.append(f"map element {mapname} {ifname}" if nft.map_exists(table, mapname)
                                   else f"map {mapname}")
                elif target != name:
                    missing.append(f"map element {mapname} {ifname} (jumps to {target or '?'}, not {name})")
                if nft.chain(table, name) is None:
                    missing.append(f"chain {name}")
                    continue
                have, want = nft.rule_count(table, name), expected.get(role)
                if (want is not None and have != want) or (want is None and have == 0):
                    missing.append(f"rules of chain {name} ({have} of {want if want is not None else 'some'})")
            return missing
    except OSError as e:
        raise NetworkError(f"cannot read the nftables ruleset: {e.strerror or e}",
                           hint="dispo needs CAP_NET_ADMIN (run it as root)") from None


def leftover_rules(session_id: str) -> list[str]:
    """The opposite question, for after a session ended (a disposal receipt): which of its chains and map
    elements still exist in this network namespace; [] = none. Same cost as missing_rules."""
    table = firewall.TABLE
    try:
        with NftReader() as nft:
            if not nft.table_exists(table):
                return []
            ifname = links.link_name(session_id)
            left = [f"map element {firewall.MAPS[role]} {ifname}" for role in firewall.ROLES
                    if nft.map_jump(table, firewall.MAPS[role], ifname) is not None]
            return left + [f"chain {name}" for name in (firewall.chain_name(session_id, r) for r in firewall.ROLES)
                           if nft.chain(table, name) is not None]
    except OSError as e:
        raise NetworkError(f"cannot read the nftables ruleset: {e.strerror or e}",
                           hint="dispo needs CAP_NET_ADMIN (run it as root)") from None


def rules_gone_reason(missing: list[str]) -> str:
    """The end reason for a session whose rules went: RULES_GONE plus what was found missing first."""
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return f"{RULES_GONE} [missing: {missing[0]}{more}]" if missing else RULES_GONE
