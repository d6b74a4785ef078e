"""`dispo verify`: look at the host, not at the journals, for anything that looks like dispo's and has no live
owner: session journals, session disks, taps, nftables chains, address leases, stand-in namespaces, VMM and
helper processes. A clean host lists nothing (exit 0); anything found is listed (exit 1) for `dispo gc`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dispo.config import Config
from dispo.errors import DispoError
from dispo.infra import journal

_SID = r"([0-9a-f]{8})"
_PROC_RE = re.compile(rf"\bdispo-{_SID}\b")       # qemu -name dispo-<id>, firecracker --id dispo-<id>
_DISK_RE = re.compile(rf"^{_SID}$")


@dataclass
class Findings:
    live: set[str] = field(default_factory=set)     # sessions whose owner holds the journal lock
    orphans: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.orphans.append(what)


def _processes(cfg: Config, f: Findings) -> None:
    # Only processes that name this state dir or workspace (a VMM's sockets, logs and disk; the app ssh's
    # keys): another dispo with other directories on the same host has its own owners.
    mine = (str(cfg.state_dir), str(cfg.workspace))
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        m = _PROC_RE.search(cmdline)
        if m and m.group(1) not in f.live and (any(d in cmdline for d in mine) or _env_names(entry, cfg)):
            f.add(f"process {entry.name} of session {m.group(1)}: {cmdline[:120].strip()}")


def _network(cfg: Config, f: Findings) -> None:
    # The orphan sweep's own listing, without removing anything: leases, links, stand-in namespaces and
    # nftables chains and map elements marked with this state dir whose session has no journal.
    from dispo.net import orphans

    for what in orphans.sweep(cfg.state_dir, dry_run=True).removed:
        f.add(what)


def _pool(cfg: Config, f: Findings) -> None:
    # The workspace's pool file, its mount and its loop device are the workspace's own (storage/pool.py); a
    # half-made pool file and a loop device left on a pool file that is not the mounted pool are not.
    from dispo.storage import pool

    if cfg.workspace.is_dir():
        for p in cfg.workspace.iterdir():
            if p.name.startswith(".pool-") and p.name.endswith(".btrfs") and p.name[6:14] not in f.live:
                f.add(f"half-made storage pool {p}")
    for device, back in pool.stray_loops(cfg):
        f.add(f"loop device {device} on {back}")


def _env_names(proc: Path, cfg: Config) -> bool:
    """The process's environment names this state dir (a VMM, whose command line holds no path)."""
    try:
        env = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"DISPO_STATE_DIR={cfg.state_dir}".encode() in env


def scan(cfg: Config, *, network: bool = True) -> Findings:
    f = Findings()
    from dispo.storage import pool

    with contextlib.suppress(DispoError):  # after a reboot: session disks in the pool are seen once it is mounted
        pool.attach(cfg)
    infos = list(journal.scan(cfg.state_dir))
    f.live = {i.session_id for i in infos if i.alive}
    for i in infos:
        if not i.alive:
            f.add(f"journal {i.path} (owner gone, {len(i.resources)} object(s) recorded)")
    root = journal.sessions_root(cfg.state_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".new-"):
                f.add(f"half-made journal {p}")
    if cfg.disks_dir.is_dir():
        for p in cfg.disks_dir.iterdir():
            m = _DISK_RE.match(p.name)
            if m and m.group(1) not in f.live:
                f.add(f"session disk {p}")
    if cfg.images_dir.is_dir():
        for p in cfg.images_dir.iterdir():
            if p.name.startswith(".import-"):
                f.add(f"half-made image import {p}")
    _pool(cfg, f)
    _processes(cfg, f)
    if network:
        _network(cfg, f)
    return f
