"""A session's private copy-on-write disk of an image: cloned into the session's transaction, deleted with it."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dispo.config import Config, StorageBackend
from dispo.infra.journal import Journal
from dispo.infra.txn import Transaction, transaction
from dispo.names import check_name
from dispo.storage import backends, images, layout, pool, workspace
from dispo.storage.templates import Template

log = logging.getLogger(__name__)


def clone(tx: Transaction, image: images.Image) -> Path:
    """The session's disk directory (<workspace>/sessions/<id>, holding ROOTFS), recorded before it exists."""
    workspace.ensure(tx.cfg)  # may move the image into the workspace's new pool: its storage is read after
    return _clone(tx, image.path, images.Image.load(image.path).storage)


def clone_template(tx: Transaction, template: Template) -> Path:
    """The same from a template: its disk only (the memory is read, never copied for a session). On btrfs, a
    reflink of that one file into a directory, not a snapshot of the template's subvolume: a snapshot commits
    the filesystem's transaction (every other session's pending writes with it: 0.1 s and more on a busy host)
    and would then have to drop the memory file it copied, while the reflink touches the disk's extents alone,
    and its removal is one unlink instead of two btrfs processes."""
    storage = StorageBackend.REFLINK if template.storage is StorageBackend.BTRFS else template.storage
    return _clone(tx, template.path, storage, only=(layout.ROOTFS,))


def _clone(tx: Transaction, src: Path, storage: StorageBackend, only: tuple[str, ...] | None = None) -> Path:
    workspace.ensure(tx.cfg)
    t0 = time.monotonic()
    be = backends.backend(storage)
    dest = tx.cfg.disks_dir / tx.session_id
    with pool.in_use(tx.cfg):  # the workspace is not switched to its pool under a disk being made
        tx.journal.record(be.undo_kind, path=str(dest))
        if os.path.lexists(dest):  # left over by a crash under the same id: delete before create
            backends.remove_tree(dest)
        be.clone(src, dest, only)
    log.info("session %s: disk ready in %.3f s (%s)", tx.session_id, time.monotonic() - t0, storage.value)
    return dest


@dataclass
class DiskSession:
    """A transaction with a private disk of `image` (for `dispo disk` and the disk demo)."""

    tx: Transaction
    image: images.Image
    disk_dir: Path

    @property
    def disk(self) -> Path:
        return self.disk_dir / layout.ROOTFS

    @property
    def session_id(self) -> str:
        return self.tx.session_id

    @property
    def state_path(self) -> Path:
        return self.tx.state_path

    @property
    def journal(self) -> Journal:
        return self.tx.journal

    @property
    def cfg(self) -> Config:
        return self.tx.cfg


@contextlib.contextmanager
def open_session(cfg: Config, *, image: str, name: str | None = None) -> Iterator[DiskSession]:
    """A disposable session on `image`: a private copy-on-write disk that is deleted at the end."""
    if name is not None:
        check_name(name, what="session name")
    workspace.ensure(cfg)  # first: the image may move into the workspace's pool
    img = images.ImageStore(cfg).get(image)
    with transaction(cfg, purpose="session", image=img.name, name=name or "") as tx:
        yield DiskSession(tx, img, clone(tx, img))
