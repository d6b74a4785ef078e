"""The workspace directory: images/ and sessions/ (per-session disks), and its storage backend.

A workspace whose filesystem can neither snapshot nor reflink gets a btrfs pool of its own (storage/pool.py),
unless [storage] pool = "none" or a backend is forced."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dispo.config import Config, StorageBackend, StoragePool
from dispo.errors import PermissionProblem
from dispo.storage import backends, pool

WORKSPACE_HINT = "set DISPO_WORKSPACE (or workspace = in the config) to a writable directory"


def ensure(cfg: Config) -> None:
    """Create the workspace layout (in the pool where there is one, mounted), or say why it cannot be used."""
    try:
        cfg.workspace.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unusable(cfg.workspace, e) from None
    if pool.switched(cfg):
        pool.attach(cfg)
    elif wants_pool(cfg):
        pool.ensure(cfg)
    for d in (cfg.images_dir, cfg.disks_dir):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unusable(cfg.workspace, e) from None
    if os.statvfs(cfg.workspace).f_flag & os.ST_RDONLY:
        raise PermissionProblem(f"workspace {cfg.workspace} is on a read-only filesystem", hint=WORKSPACE_HINT)
    if not os.access(cfg.images_dir, os.W_OK) or not os.access(cfg.disks_dir, os.W_OK):
        raise PermissionProblem(f"workspace {cfg.workspace} is not writable by this user", hint=WORKSPACE_HINT)


def _unusable(workspace: Path, e: OSError) -> PermissionProblem:
    why = {errno.EROFS: "is on a read-only filesystem", errno.EACCES: "is not writable by this user",
           errno.EPERM: "is not writable by this user"}.get(e.errno or 0, f"cannot be created ({e.strerror})")
    return PermissionProblem(f"workspace {workspace} {why}", hint=WORKSPACE_HINT)


def wants_pool(cfg: Config) -> bool:
    """Backend 'auto' with the pool on, on a workspace that could only copy."""
    return (cfg.storage.backend is StorageBackend.AUTO and cfg.storage.pool is StoragePool.LOOP_BTRFS
            and not os.statvfs(cfg.workspace).f_flag & os.ST_RDONLY
            and backends.probe(cfg.workspace) is StorageBackend.COPY)


def storage_backend(cfg: Config) -> StorageBackend:
    """The configured backend, checked against the filesystem; or the probed best one for 'auto'. Images live
    in images/ (in the workspace's pool where it has one), so that is where it is probed."""
    where = cfg.images_dir if cfg.images_dir.is_dir() else cfg.workspace
    if cfg.storage.backend is StorageBackend.AUTO:
        return backends.probe(where)
    backends.check_forced(cfg.storage.backend, where)
    return cfg.storage.backend
