"""Volumes: what a session keeps on purpose (`dispo run chromium --keep NAME`), everything else being thrown away.

A volume is an ext4 file `<workspace>/volumes/NAME.ext4` (sparse; labelled `dispo-keep`, its root owned by
the guest's user), attached to the session as a second disk and mounted by the guest over the app's profile
directory (the profile's `keep_path`, browser-setup.sh). One session at a time: the session holds an exclusive
lock on `NAME.lock` while it runs, so a second session with the same NAME, or `dispo volume rm NAME`, is
refused meanwhile. A new volume is made under a temporary name recorded in the session's journal (a failure
leaves nothing half-made) and renamed into place once complete; from then on it is not the session's: the
disposal receipt lists it as kept, not as left over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispo import guest
from dispo.config import Config
from dispo.errors import Conflict, InvalidInput, NotFound
from dispo.infra.proc import run
from dispo.infra.txn import Transaction
from dispo.names import check_name

SUFFIX = ".ext4"
LABEL = "dispo-keep"
SIZE_MIB = 4096  # sparse: a new volume takes a few MiB on the host until the browser fills it


def volumes_dir(cfg: Config) -> Path:
    return cfg.workspace / "volumes"


@dataclass(frozen=True)
class Volume:
    name: str
    path: Path
    size: int          # the guest sees this much
    used: int          # bytes it takes on the host
    modified: float
    in_use: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "size": self.size, "used": self.used,
                "modified": self.modified, "in_use": self.in_use}


def _dir(cfg: Config) -> Path:
    d = volumes_dir(cfg)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(cfg: Config, name: str) -> Iterator[int]:
    fd = os.open(_dir(cfg) / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise Conflict(f"volume {name!r} is in use by another session",
                               hint="end that session first ('dispo ls'), or use another --keep NAME") from None
            raise
        yield fd
    finally:
        os.close(fd)


def attach(tx: Transaction, name: str) -> Path:
    """The volume NAME for this session (made on first use), locked until the session's teardown."""
    check_name(name, what="volume name")
    tx.stack.enter_context(_locked(tx.cfg, name))
    path = volumes_dir(tx.cfg) / f"{name}{SUFFIX}"
    if path.is_file() and not path.is_symlink():
        return path
    tmp = path.with_name(f".{name}.{tx.session_id}.new")
    entry = tx.journal.record("path", path=str(tmp), session=tx.session_id)
    with open(tmp, "xb") as f:
        f.truncate(SIZE_MIB << 20)
    # The root directory belongs to the guest's user, so the browser can write its profile there.
    run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-E", f"root_owner={guest.USER_UID}:{guest.USER_UID}",
         "-m", "0", tmp], hint="install e2fsprogs")
    os.rename(tmp, path)
    tx.journal.forget(entry)  # the volume is kept on purpose: no longer the session's to remove
    return path


def _in_use(cfg: Config, name: str) -> bool:
    try:
        with _locked(cfg, name):
            return False
    except Conflict:
        return True


def list_volumes(cfg: Config) -> list[Volume]:
    d = volumes_dir(cfg)
    if not d.is_dir():
        return []
    found = []
    for p in sorted(d.glob(f"*{SUFFIX}")):
        name = p.name[: -len(SUFFIX)]
        if p.is_symlink() or not p.is_file() or name.startswith("."):
            continue
        st = p.stat()
        found.append(Volume(name, p, st.st_size, st.st_blocks * 512, st.st_mtime, _in_use(cfg, name)))
    return found


def remove(cfg: Config, name: str) -> Path:
    check_name(name, what="volume name")
    path = volumes_dir(cfg) / f"{name}{SUFFIX}"
    if not path.exists():
        raise NotFound(f"no volume named {name!r}", hint="list them with 'dispo volume ls'")
    if path.is_symlink() or not path.is_file():
        raise InvalidInput(f"{path} is not a volume file", hint="remove it by hand")
    with _locked(cfg, name):
        path.unlink()
        (volumes_dir(cfg) / f"{name}.lock").unlink(missing_ok=True)
    return path


def describe(path: Path) -> str:
    return f"volume {path.name[: -len(SUFFIX)]} ({path}, kept on purpose)"


__all__ = ["LABEL", "Volume", "attach", "describe", "list_volumes", "remove", "volumes_dir"]
