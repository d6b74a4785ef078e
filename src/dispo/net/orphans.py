"""Sweep network objects that no session journal accounts for (the journal itself was lost).

The journal is the normal way back (`dispo gc` unwinds a dead session's journal). This sweep is for what is
left when even the journal is gone: leases, "dsp-<id>" links and nftables chains whose session id has no
journal under this state directory. Links name their state directory in their alias, so links of another
dispo (another state directory) in the same namespace are left alone, and so are their rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dispo import journal
from dispo.net import firewall, links, pool

# A lease file that could not be parsed is only swept when older than this (it may be being written).
_LEASE_GRACE_S = 60.0


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _known_sessions(state_dir: Path) -> set[str]:
    root = journal.sessions_root(state_dir)
    if not root.is_dir():
        return set()
    return {p.name.removeprefix(".new-") for p in root.iterdir()}


def sweep(state_dir: Path) -> SweepReport:
    report = SweepReport()
    known = _known_sessions(state_dir)
    for lease in pool.read_leases(state_dir):
        stale = not lease.session_id and time.time() - lease.created > _LEASE_GRACE_S
        if (lease.session_id and lease.session_id not in known) or stale:
            lease.path.unlink(missing_ok=True)
            report.removed.append(f"lease {lease.subnet} (session {lease.session_id or '?'})")
    mine = f" state {state_dir}"
    foreign: set[str] = set()
    for link in links.dispo_links():
        sid = link.name.removeprefix(links.LINK_PREFIX)
        if not link.alias.endswith(mine):
            foreign.add(sid)
            report.kept.append(f"link {link.name} ({link.alias or 'no alias'}: not this state directory's)")
        elif sid not in known:
            links.delete_link(link.name)
            report.removed.append(f"link {link.name}")
    for name in links.list_standin_netns():
        sid = name.removeprefix(links.STANDIN_NETNS_PREFIX)
        if sid not in known:
            links.remove_netns(name)
            report.removed.append(f"netns {name}")
    state = firewall.table_state()
    if state is not None:
        for sid in sorted(state.session_ids() - known - foreign):
            firewall.remove(state_dir, sid)
            report.removed.append(f"nftables chains of session {sid}")
        if firewall.remove_if_empty(state_dir):
            report.removed.append(f"nftables table {firewall.FAMILY} {firewall.TABLE} (empty)")
    return report
