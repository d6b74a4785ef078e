"""A session: an id, a journal, and the host objects made for it, undone in reverse when it ends.

`transaction()` is the bare form (a journal that is unwound at the end), used for work such as an
image import that must leave nothing behind if it fails. `open_session()` adds the private disk;
later layers (network, VMM) add their objects to the same journal and ExitStack.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispo.config import Config
from dispo.journal import Journal
from dispo.names import check_name, new_session_id

if TYPE_CHECKING:
    from dispo.images import Image

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: Config
    journal: Journal
    stack: contextlib.ExitStack
    image: Image | None = None
    disk_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def session_id(self) -> str:
        return self.journal.session_id

    @property
    def state_path(self) -> Path:
        """Per-session directory for sockets, logs and keys; removed with the journal."""
        return self.journal.path

    @property
    def disk(self) -> Path:
        assert self.disk_dir is not None, "session has no disk"
        from dispo.images import ROOTFS

        return self.disk_dir / ROOTFS


@contextlib.contextmanager
def transaction(cfg: Config, *, purpose: str, **meta: Any) -> Iterator[Session]:
    """A journal whose recorded objects are all undone when the block ends, however it ends."""
    sid = new_session_id()
    journal = Journal.create(cfg.state_dir, sid, {"purpose": purpose, **meta})
    with contextlib.ExitStack() as stack:
        # Registered first so it runs last: after every context the block entered has closed.
        stack.callback(journal.unwind)
        yield Session(cfg, journal, stack)


@contextlib.contextmanager
def open_session(cfg: Config, *, image: str, name: str | None = None) -> Iterator[Session]:
    """A disposable session on `image`: a private copy-on-write disk that is deleted at the end."""
    from dispo import images, workspace
    from dispo.storage import backends

    if name is not None:
        check_name(name, what="session name")
    img = images.ImageStore(cfg).get(image)
    workspace.ensure(cfg)
    t0 = time.monotonic()
    with transaction(cfg, purpose="session", image=img.name, name=name or "") as s:
        s.image = img
        be = backends.backend(img.storage)
        dest = cfg.disks_dir / s.session_id
        s.journal.record(be.undo_kind, path=str(dest))
        if os.path.lexists(dest):  # left over by a crash under the same id: delete before create
            backends.remove_tree(dest)
        be.clone(img.path, dest)
        s.disk_dir = dest
        log.info("session %s: disk ready in %.3f s (%s)", s.session_id, time.monotonic() - t0, img.storage.value)
        yield s
