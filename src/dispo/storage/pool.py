"""The workspace's own btrfs pool, for a workspace whose filesystem can neither snapshot nor reflink.

On such a filesystem (ext4: the usual root) every session would copy its whole image. With the defaults
(`[storage] backend = "auto"`, `pool = "loop-btrfs"`) dispo instead gives the workspace a btrfs filesystem
in a file, as LXD and Incus do for their default pool, and keeps images, session disks and templates there:
an image is a read-only subvolume and a session's disk a snapshot of it, made in the same time whatever the
image's size. The workspace then reads:

    pool.btrfs      a sparse file as large as the workspace's filesystem: blocks are used only as data is
                    written, so the pool never stops a workspace that still has room
    pool/           its mount point (loop, nosuid; not nodev: a jail's chroot beside a disk has devices)
    images -> pool/images, sessions -> pool/sessions, templates -> pool/templates   (relative symlinks)

- Made once, journal first: `.pool-<id>.btrfs` is recorded in a transaction before it exists, formatted and
  only then renamed to pool.btrfs. A half-made one goes with the journal's unwind, or with `dispo gc` after a
  reboot (its id has no journal).
- The mount does not survive a reboot: `attach()` mounts it again on the next use, idempotently, under an
  exclusive flock on `.pool.lock` so two dispo commands never mount it twice. Until then the symlinks dangle,
  so nothing is ever written to the workspace's own filesystem in the pool's place.
- Images imported before the pool are moved into it when it is made (copied once into a subvolume, their
  sha256 checked, sealed); templates made before are dropped (a cache: `dispo template build` remakes them).
  The switch waits until no session disk or import uses the old layout: those hold `in_use()` (a shared
  lock), and while it waits sessions copy as before.
- `pool = "none"` never makes one (a pool made earlier is still mounted and used: its images live there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dispo.config import Config, StorageBackend
from dispo.errors import CommandError, DispoError, StorageError
from dispo.infra.proc import run
from dispo.names import format_size
from dispo.storage import backends, files
from dispo.storage.layout import META, ROOTFS

log = logging.getLogger(__name__)

FILE = "pool.btrfs"
MOUNT = "pool"
LOCK = ".pool.lock"
LABEL = "dispo-pool"
#: the workspace directories that live in the pool; images last, so its symlink marks a finished switch
LAYOUT = ("sessions", "templates", "images")
MAX_SIZE = (16 << 40) - (64 << 20)  # ext4's largest file (4 KiB blocks), with room to spare
MIN_SIZE = 256 << 20
# Not nodev: a jailed Firecracker's chroot is made beside the session disk, with device nodes (jail_base).
MOUNT_OPTS = "loop,nosuid,discard"  # freed blocks are punched out of pool.btrfs: the host gets them back

_said: set[str] = set()


def file_of(cfg: Config) -> Path:
    return cfg.workspace / FILE


def mountpoint(cfg: Config) -> Path:
    return cfg.workspace / MOUNT


def switched(cfg: Config) -> bool:
    """The workspace's images/ (and the rest) live in the pool."""
    return (cfg.workspace / "images").is_symlink() and file_of(cfg).is_file()


def mounted(cfg: Config) -> bool:
    return os.path.ismount(mountpoint(cfg))


@contextlib.contextmanager
def _lock(cfg: Config, how: int) -> Iterator[None]:
    fd = os.open(cfg.workspace / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_use(cfg: Config) -> Iterator[None]:
    """Held while a session disk or an import is being made, so the switch to the pool never moves the layout
    from under it. Shared: any number of them at once; only the switch takes the lock exclusively."""
    if not cfg.workspace.is_dir():
        yield
        return
    with _lock(cfg, fcntl.LOCK_SH):
        yield


def attach(cfg: Config) -> None:
    """Mount the pool if this workspace has one and it is not mounted (after a reboot). Idempotent."""
    if not file_of(cfg).is_file() or mounted(cfg):
        return
    with _lock(cfg, fcntl.LOCK_EX):
        if not mounted(cfg):  # another dispo may have mounted it while we waited
            _mount(cfg)


def _mount(cfg: Config) -> None:
    mnt = mountpoint(cfg)
    mnt.mkdir(mode=0o755, exist_ok=True)
    try:
        run(["mount", "-t", "btrfs", "-o", MOUNT_OPTS, file_of(cfg), mnt], hint=backends.BTRFS_HINT)
    except CommandError as e:
        raise StorageError(f"cannot mount the workspace's storage pool {file_of(cfg)}: {e.stderr.strip()}",
                           hint="check that the btrfs kernel module and loop devices are available "
                                "(modprobe btrfs loop)") from None
    log.info("mounted the storage pool %s at %s", file_of(cfg), mnt)


def ensure(cfg: Config) -> str | None:
    """Make, mount and switch to the pool as needed; None when the workspace's disks live in it, else why not
    (one line, said once: the caller copies as before)."""
    why = _why_not(cfg)
    if why is None:
        try:
            if not file_of(cfg).is_file():
                _make(cfg)
            attach(cfg)
            why = _switch(cfg)
        except (DispoError, OSError) as e:
            why = str(e) if isinstance(e, DispoError) else f"{e.strerror or e}"
    if why is not None and why not in _said:
        _said.add(why)
        log.warning("no btrfs storage pool for the workspace: %s", why)
    return why


def _why_not(cfg: Config) -> str | None:
    if os.geteuid() != 0:
        return "loop-mounting it needs root"
    for tool in ("mkfs.btrfs", "btrfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({backends.BTRFS_HINT})"
    if not Path("/dev/loop-control").exists():
        return "this host has no loop devices (/dev/loop-control)"
    return None


def _size(cfg: Config) -> int:
    st = os.statvfs(cfg.workspace)
    return min(st.f_blocks * st.f_frsize, MAX_SIZE)


def _make(cfg: Config) -> None:
    """pool.btrfs, made under a journaled temporary name and renamed into place only when formatted."""
    from dispo.infra.txn import transaction

    size = _size(cfg)
    if size < MIN_SIZE:
        raise StorageError(f"the workspace's filesystem is too small for a pool ({format_size(size)})")
    with _lock(cfg, fcntl.LOCK_EX), transaction(cfg, purpose="make the workspace's storage pool") as t:
        if file_of(cfg).is_file():
            return  # another dispo made it while we waited
        tmp = cfg.workspace / f".pool-{t.session_id}.btrfs"
        entry = t.journal.record("path", path=str(tmp))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: no block is used until written
        finally:
            os.close(fd)
        try:
            run(["mkfs.btrfs", "-q", "-L", LABEL, tmp], hint=backends.BTRFS_HINT)
        except CommandError as e:
            raise StorageError(f"mkfs.btrfs failed: {e.stderr.strip().splitlines()[-1:]}") from None
        os.rename(tmp, file_of(cfg))
        t.journal.forget(entry)
    log.warning("made a btrfs storage pool %s (sparse, up to %s) for the workspace, whose filesystem cannot "
                "snapshot: session disks are snapshots there (set [storage] pool = \"none\" to copy instead)",
                file_of(cfg), format_size(size))


def _switch(cfg: Config) -> str | None:
    """Point images/, sessions/, templates/ into the mounted pool, moving existing images in. Idempotent (a
    switch cut short is finished next time); waits for no one: a busy workspace is switched on a later use."""
    if switched(cfg):
        return None
    ws = cfg.workspace
    fd = os.open(ws / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "the workspace is in use (a session or an import); the pool is used from its next idle use"
        if switched(cfg):
            return None
        if not mounted(cfg):
            _mount(cfg)
        busy = _busy(cfg)
        if busy:
            return f"{busy} still use(s) the old layout; the pool is used once they are gone (see 'dispo gc')"
        pool = mountpoint(cfg)
        for name in LAYOUT:
            (pool / name).mkdir(mode=0o755, exist_ok=True)
        if (ws / "images").is_dir():
            _move_images(ws / "images", pool / "images")
        for name in LAYOUT:
            _relink(ws, name)
    finally:
        os.close(fd)
    return None


def _busy(cfg: Config) -> str:
    """What of the old layout a live (or dead but not yet collected) session may still use."""
    ws = cfg.workspace
    found = [p.name for name in ("sessions",) if (ws / name).is_dir() and not (ws / name).is_symlink()
             for p in (ws / name).iterdir()]
    for name in ("images", "templates"):
        if (ws / name).is_dir() and not (ws / name).is_symlink():
            found += [p.name for p in (ws / name).iterdir() if p.name.startswith((".import-", ".build-"))]
    return ", ".join(sorted(found)[:3]) + (" ..." if len(found) > 3 else "")


def _move_images(old: Path, new: Path) -> None:
    """Each image of the old layout into a read-only subvolume of the pool, checked against its sha256."""
    be = backends.BtrfsBackend()
    for src in sorted(old.iterdir()):
        if src.name.startswith(".") or not (src / META).is_file() or (new / src.name / META).exists():
            continue  # not an image, or moved by a switch cut short
        tmp = new / f".move-{src.name}"
        backends.remove_tree(tmp)
        be.make_holder(tmp)
        meta = json.loads((src / META).read_text())
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.is_symlink() and f.name != META:
                files.sparse_copy(f, tmp / f.name)
                os.chmod(tmp / f.name, f.stat().st_mode & 0o777)
        if files.sha256_file(tmp / ROOTFS) != meta.get("sha256"):
            backends.remove_tree(tmp)
            raise StorageError(f"image {src.name!r} does not match its recorded sha256; it was not moved",
                               hint=f"check it with 'dispo image verify {src.name}', or remove it")
        meta["storage"] = StorageBackend.BTRFS.value
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp / META, 0o444)
        be.seal(tmp)
        os.rename(tmp, new / src.name)
        log.info("moved image %s into the storage pool", src.name)


def _relink(ws: Path, name: str) -> None:
    link = ws / name
    if link.is_symlink():
        return
    old = ws / f".old-{name}"
    if os.path.lexists(link):
        backends.remove_tree(old)
        os.rename(link, old)
    with contextlib.suppress(FileExistsError):
        os.symlink(Path(MOUNT) / name, link)
    # Its images are in the pool now (checked), its sessions dir is empty, its templates are a cache.
    _remove_old(old)


def _remove_old(old: Path) -> None:
    if not os.path.lexists(old):
        return
    for p in sorted(old.iterdir()) if old.is_dir() else ():
        backends.remove_tree(p)
    backends.remove_tree(old)


def stray_loops(cfg: Config) -> list[tuple[str, str]]:
    """(loop device, backing file) of this workspace's pool files that are not the mounted pool: a pool file
    deleted while attached, or a half-made one. The mounted pool's own device is dispo's, never a stray."""
    try:
        out = run(["losetup", "--json", "--list"], check=False).stdout
        devices = json.loads(out or "{}").get("loopdevices", [])
    except (CommandError, ValueError, OSError):
        return []
    ours = _mounted_source(cfg)
    prefix = os.path.realpath(cfg.workspace) + "/"
    found = []
    for d in devices:
        back, name = str(d.get("back-file") or ""), str(d.get("name") or "")
        base = back.removesuffix(" (deleted)")
        if not base.startswith(prefix) or "/" in base[len(prefix):]:
            continue
        if Path(base).name != FILE and not Path(base).name.startswith(".pool-"):
            continue
        if name != ours or back.endswith("(deleted)"):
            found.append((name, back))
    return found


def _mounted_source(cfg: Config) -> str:
    target = os.path.realpath(mountpoint(cfg))
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == target and " - " in line:
                return line.split(" - ", 1)[1].split()[1]
    return ""


def detach(device: str) -> None:
    """Detach a stray loop device (the kernel refuses while it is mounted: then it is left alone)."""
    with contextlib.suppress(CommandError):
        run(["losetup", "-d", device])


__all__ = ["FILE", "LAYOUT", "MOUNT", "attach", "detach", "ensure", "file_of", "in_use", "mounted",
           "mountpoint", "stray_loops", "switched"]
