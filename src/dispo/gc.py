"""`dispo gc`: undo what dead sessions recorded, then sweep what no journal accounts for.

The journal pass (journal.gc) handles every crash the owner survived long enough to record. The sweep
handles the rest: the state dir lives on tmpfs (/run), so after a reboot the journals are gone while
session disks in the persistent workspace remain. A disk or a half-made import whose session id has no
journal cannot belong to a live session (the journal is always created first), so it is removed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dispo.config import Config
from dispo.errors import DispoError, NotClean
from dispo.infra import journal, undo
from dispo.storage.backends import remove_tree

log = logging.getLogger(__name__)

_IMPORT_RE = re.compile(r"^\.import-([0-9a-f]{8})-")
_DISK_RE = re.compile(r"^[0-9a-f]{8}$")
_FETCH_RE = re.compile(r"^\.fetch-([0-9a-f]{8})$")             # <workspace>/.fetch-<id> (dispo image fetch)
_POOL_RE = re.compile(r"^\.pool-([0-9a-f]{8})\.btrfs$")         # <workspace>/.pool-<id>.btrfs: a pool half made
_BUILD_RE = re.compile(r"^\.(?:build|from)-([0-9a-f]{8})-")  # <cache>/images/.build-<id>-R, .from-<id>-NAME

#: Other layers add functions that remove their own orphans (objects named with a session id that has no
#: journal); each gets the config and the set of session ids that still have a journal.
OrphanSweeper = Callable[[Config, set[str]], list[str]]


def _sweep_network(cfg: Config, known: set[str]) -> list[str]:
    # Leases, dsp-* links, stand-in namespaces and nftables chains of this state dir with no journal. It ignores
    # `known` (read before the sweep began): it lists under the pool lock and only then reads the journals, so
    # a session starting meanwhile is never mistaken for an orphan (see net/orphans.py).
    from dispo.net import orphans

    return orphans.sweep(cfg.state_dir).removed


def _sweep_pool_loops(cfg: Config, known: set[str]) -> list[str]:
    # Loop devices left on this workspace's pool files that are not the mounted pool (a deleted pool file, a
    # half-made one). The mounted pool and its device are the workspace's, not a session's: never swept.
    from dispo.storage import pool

    removed = []
    for device, back in pool.stray_loops(cfg):
        pool.detach(device)
        removed.append(f"loop device {device} ({back})")
    return removed


ORPHAN_SWEEPERS: list[OrphanSweeper] = [_sweep_pool_loops, _sweep_network]


@dataclass
class Report:
    reclaimed: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    failed: list[DispoError] = field(default_factory=list)


def known_session_ids(cfg: Config) -> set[str]:
    root = journal.sessions_root(cfg.state_dir)
    if not root.is_dir():
        return set()
    return {p.name.removeprefix(".new-") for p in root.iterdir()}


def sweep_workspace(cfg: Config, known: set[str]) -> list[str]:
    # List first, then ask for the journals: a disk listed now had its journal created before it, so a
    # session that starts while we run is always in the fresh set and never mistaken for an orphan.
    candidates: list[tuple[str, Path]] = []
    if cfg.disks_dir.is_dir():
        candidates += [(p.name, p) for p in cfg.disks_dir.iterdir() if _DISK_RE.match(p.name)]
    if cfg.images_dir.is_dir():
        candidates += [(m.group(1), p) for p in cfg.images_dir.iterdir() if (m := _IMPORT_RE.match(p.name))]
    if cfg.workspace.is_dir():
        candidates += [(m.group(1), p) for p in cfg.workspace.iterdir()
                       if (m := _FETCH_RE.match(p.name) or _POOL_RE.match(p.name))]
    builds: list[tuple[str, Path]] = []
    cache = _cache_dir() / "images"
    if cache.is_dir():
        builds = [(m.group(1), p) for p in cache.iterdir() if (m := _BUILD_RE.match(p.name))]
    known = known | known_session_ids(cfg)
    removed: list[str] = []
    for sid, p in candidates:
        if sid not in known:
            remove_tree(p)
            removed.append(str(p))
    from dispo.imagebuild.owner import owned_by

    for sid, p in builds:
        if sid not in known and owned_by(p, cfg):
            # A build tree may still hold mounts (/proc, /sys, /dev of a killed mmdebstrap or chroot): the
            # build-dir undo unmounts before it deletes, never reaching into the host's /dev.
            undo.lookup("build-dir")({"path": str(p)})
            removed.append(str(p))
    return removed


def _cache_dir() -> Path:
    from dispo.imagebuild import cache_dir

    return cache_dir()


def reclaim_journals(cfg: Config) -> journal.GcReport:
    """The journal pass (dispo gc, dispod's start, every acting command): unwind what dead owners recorded,
    then give each reclaimed session its disposal receipt, so the crash path gets its proof like every other
    end. A receipt that is not clean, or that cannot be written, is one of the report's failures."""
    from dispo import receipt

    jr = journal.gc(cfg.state_dir)
    for done in jr.sessions:
        if done.meta.get("purpose") != "session":  # builds, imports and fetches are not sessions
            continue
        try:
            r = receipt.issue_reclaimed(cfg, session_id=done.session_id, meta=done.meta,
                                        entries=list(done.entries), state_path=done.path, teardown_s=done.teardown_s)
        except OSError as e:
            jr.failed.append(DispoError(f"session {done.session_id}: reclaimed, but its disposal receipt could not "
                                        f"be written: {e.strerror or e}"))
            continue
        if not r.clean:
            jr.failed.append(NotClean(done.session_id, r.leftovers))
    return jr


def collect(cfg: Config) -> Report:
    report = Report()
    try:  # after a reboot the workspace's pool (and so its session disks) must be mounted to be swept
        from dispo.storage import pool

        pool.attach(cfg)
    except DispoError as e:
        report.failed.append(e)
    jr = reclaim_journals(cfg)
    report.reclaimed, report.undone = jr.reclaimed, jr.undone
    report.failed.extend(jr.failed)
    known = known_session_ids(cfg)
    for sweeper in (sweep_workspace, *ORPHAN_SWEEPERS):  # the network last: rules outlive the links
        try:
            report.orphans += sweeper(cfg, known)
        except DispoError as e:
            report.failed.append(e)
        except OSError as e:
            report.failed.append(DispoError(f"sweeping orphans failed: {e}"))
    return report



