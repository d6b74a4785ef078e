"""Sweep network objects that no session journal accounts for (the journal itself was lost).

The journal is the normal way back (`dispo gc` unwinds a dead session's journal). This sweep is for what is
left when even the journal is gone: leases, "dsp-<id>" links, stand-in namespaces and nftables chains and map
elements of this state directory whose session id has no journal.

Two rules keep it from removing what is alive:
- It holds the state dir's pool lock (pool.net_lock) throughout, the lock a session holds from its lease to
  its link, and it lists what exists *before* it reads the journals. Every object it lists was made by a
  session whose journal existed before the object (record before create) and still exists unless the session
  ended; so an object whose id has no journal afterwards is really an orphan, and a session that starts
  meanwhile is either not listed at all or waits for the sweep at its first network step.
- It only touches what carries this state dir's owner mark (links.alias_for: the link alias, the comment on
  nftables chains and map elements, the alias of a stand-in namespace's loopback). Another dispo sharing the
  namespace (another state dir) has its own marks; unmarked objects are nobody's and are only reported. The
  `inet dispo` table goes when nobody's session has anything left in it (under firewall.table_lock, which
  every state dir shares).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dispo.infra import journal
from dispo.net import firewall, links, pool

# A lease file that could not be parsed is only swept when older than this (it may be being written).
_LEASE_GRACE_S = 60.0


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # dispo-looking objects of another state dir, or unmarked


def _known_sessions(state_dir: Path) -> set[str]:
    root = journal.sessions_root(state_dir)
    if not root.is_dir():
        return set()
    return {p.name.removeprefix(".new-") for p in root.iterdir()}


def sweep(state_dir: Path, *, dry_run: bool = False) -> SweepReport:
    """Remove this state dir's network objects whose session has no journal. With dry_run, only say which."""
    report = SweepReport()
    with pool.net_lock(state_dir):
        # 1. What exists (before the journals: see the module docstring).
        leases = pool.read_leases(state_dir)
        dlinks = links.dispo_links()
        standins = [(name, links.netns_alias(name)) for name in links.list_standin_netns()]
        state = firewall.table_state()
        comments = firewall.chain_comments() if state is not None else {}
        # 2. Which sessions have a journal.
        known = _known_sessions(state_dir)

        # 3. This state dir's objects without one.
        def gone(what: str) -> bool:
            report.removed.append(what)
            return not dry_run

        for lease in leases:
            stale = not lease.session_id and time.time() - lease.created > _LEASE_GRACE_S
            if ((lease.session_id and lease.session_id not in known) or stale) and \
                    gone(f"lease {lease.subnet} (session {lease.session_id or '?'})"):
                lease.path.unlink(missing_ok=True)
        for link in dlinks:
            sid = link.name.removeprefix(links.LINK_PREFIX)
            if link.alias != links.alias_for(sid, state_dir):
                report.kept.append(f"link {link.name} ({link.alias or 'no alias'}: not this state directory's)")
            elif sid not in known and gone(f"link {link.name}"):
                links.delete_link(link.name)
        for name, alias in standins:
            sid = name.removeprefix(links.STANDIN_NETNS_PREFIX)
            if alias != links.alias_for(sid, state_dir):
                report.kept.append(f"netns {name} ({alias or 'unmarked'}: not this state directory's)")
            elif sid not in known and gone(f"netns {name}"):
                links.remove_netns(name)
        if state is not None:
            for sid in sorted(state.session_ids() - known):
                marks = state.marks(sid, comments)
                if links.alias_for(sid, state_dir) not in marks:
                    report.kept.append(f"nftables chains of session {sid} "
                                       f"({', '.join(sorted(marks)) or 'unmarked'}: not this state directory's)")
                elif gone(f"nftables chains of session {sid}"):
                    firewall.remove(state_dir, sid)
            if not dry_run and firewall.remove_if_empty(state_dir):
                report.removed.append(f"nftables table {firewall.FAMILY} {firewall.TABLE} (empty)")
    return report
