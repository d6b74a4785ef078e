"""Running firecracker under its jailer: a chroot per session, uid/gid drop, cgroup limits.

Layout (the jailer's own): <chroot_base>/<exec file name>/<jail id>/root is the chroot; the jailer
copies the firecracker binary there, makes /dev/kvm, /dev/net/tun, /dev/urandom and /dev/userfaultfd
nodes owned by the jail uid, and puts the API socket at /run/firecracker.socket inside it. dispo links
(or reflinks, or copies) the kernel and the session disk in before starting it.

cgroups: --parent-cgroup dispo, so each jail's cgroup is <controller>/dispo/<jail id> (v1) or
dispo/<jail id> (v2), under the mounts vmm/cgroups.py finds in the mount table. The shared "dispo" parent
stays; the per-jail directories are journaled (kind "jail-cgroup") and removed after the process is gone.

Without a jailer of the firecracker's version (JailSpec.own), dispo jails firecracker itself with QEMU's
sandbox (vmm/sandbox.py): the same per-session directory, files and uid, but instead of a chroot a mount
namespace of its own (the host's data directories under empty tmpfs, a /dev with only its devices, owned by its
uid), setpriv (its uid/gid, no capabilities, no new privileges) and cgroups of its own (`sandbox.limit`). Its
working directory is the jail directory and every path it is given is relative to it, so it reaches exactly the
files placed there.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dispo.errors import VmmError
from dispo.infra.journal import Entry, Journal
from dispo.infra.undo import undoer
from dispo.storage import backends, files
from dispo.vmm import cgroups, sandbox
from dispo.vmm.cgroups import PARENT_CGROUP, remove_cgroups

CGROUP_ROOT = Path("/sys/fs/cgroup")  # the usual place; the code asks cgroups.find_hierarchy() where it is
SOCKET_INSIDE = Path("/run/firecracker.socket")


@dataclass(frozen=True)
class JailSpec:
    jailer: Path
    firecracker: Path      # must be the jailer's version: the jailer execs it inside the chroot
    chroot_base: Path      # must allow device nodes (not mounted nodev)
    uid: int | None = None  # None: a uid/gid of the session's own, allocated when the jail is made
    gid: int | None = None
    memory_limit_mib: int | None = None   # hard limit for the whole VMM process (guest RAM + overhead)
    cpu_quota: float | None = None        # in CPUs, e.g. 1.5
    netns: Path | None = None             # a network namespace file (/run/netns/NAME) to join
    own: bool = False  # no jailer: dispo's own sandbox (module docstring); `jailer` is then not run


def cgroup_version() -> int:
    return cgroups.find_hierarchy().version


def limited_controllers(spec: JailSpec) -> list[str]:
    """The cgroup controllers the jail's limits use."""
    return [c for c, used in (("memory", spec.memory_limit_mib is not None), ("cpu", spec.cpu_quota is not None))
            if used]


def cgroup_args(spec: JailSpec, version: int) -> list[str]:
    args: list[str] = []
    period = 100_000
    if spec.memory_limit_mib is not None:
        limit = spec.memory_limit_mib << 20
        args.append(f"memory.max={limit}" if version == 2 else f"memory.limit_in_bytes={limit}")
    if spec.cpu_quota is not None:
        quota = int(spec.cpu_quota * period)
        if version == 2:
            args.append(f"cpu.max={quota} {period}")
        else:
            args += [f"cpu.cfs_period_us={period}", f"cpu.cfs_quota_us={quota}"]
    return [a for arg in args for a in ("--cgroup", arg)]


class Jail:
    def __init__(self, spec: JailSpec, session_id: str) -> None:
        self.spec = spec
        self.id = f"dispo-{session_id}"
        self.base_dir = spec.chroot_base / spec.firecracker.name / self.id
        self.root = self.base_dir / "root"
        # Limits need the hierarchy found (or a one-line error now, before anything exists); none: any version.
        # Own sandbox: sandbox.limit finds it when it makes the cgroups.
        controllers = [] if spec.own else limited_controllers(spec)
        self.hierarchy = cgroups.find_hierarchy(controllers) if controllers else None
        self.version = self.hierarchy.version if self.hierarchy else 2
        self.cgroup_args = [] if spec.own else cgroup_args(spec, self.version)
        self.cgroups: list[Path] = []  # own: the cgroups the process goes into (sandbox.limit)
        self._root_fd = -1  # own: the jail directory, for short socket addresses (connect_path)

    @property
    def executable(self) -> Path:
        """What runs first: the jailer, or firecracker itself in dispo's own sandbox."""
        return self.spec.firecracker if self.spec.own else self.spec.jailer

    @property
    def socket(self) -> Path:
        return self.host(self.inside(SOCKET_INSIDE.name) if self.spec.own else SOCKET_INSIDE)

    def inside(self, name: str) -> Path:
        """How firecracker names the jail's file `name`: /name in the jailer's chroot, name relative to its
        working directory in dispo's own sandbox."""
        return Path(name) if self.spec.own else Path("/") / name

    def host(self, inside: Path) -> Path:
        """The host path of a path as firecracker sees it inside the chroot (or its working directory)."""
        return self.root / (inside.relative_to("/") if inside.is_absolute() else inside)

    @property
    def ids(self) -> tuple[int, int]:
        if self.spec.uid is None or self.spec.gid is None:
            raise VmmError("the jail's uid is not allocated yet (prepare() first)")
        return self.spec.uid, self.spec.gid

    def prepare(self, journal: Journal) -> list[Entry]:
        """Record the jail directory and cgroups, then make the (empty) chroot; delete leftovers first."""
        if not self.spec.own and "firecracker" not in self.spec.firecracker.name:
            raise VmmError(f"the jailer only runs a file named like 'firecracker*', not {self.spec.firecracker.name}",
                           hint="rename or link the binary, e.g. firecracker-v1.7.0")
        items: list[tuple[str, Mapping[str, str]]] = [("path", {"path": str(self.base_dir)})]
        dirs = (self.hierarchy.dirs(f"{PARENT_CGROUP}/{self.id}", limited_controllers(self.spec))
                if self.hierarchy is not None else [])
        if dirs:
            items.append(("jail-cgroup", {"dirs": ":".join(str(d) for d in dirs)}))
        entries = journal.record_all(items)  # one write (one fsync) for both
        remove_cgroups(dirs)
        backends.remove_tree(self.base_dir)
        self.root.mkdir(parents=True)
        if self.spec.uid is None:  # the session's own uid/gid, not the shared `nobody`
            uid = sandbox.allocate_id(journal, journal.path.parent.parent, journal.session_id)
            self.spec = dataclasses.replace(self.spec, uid=uid, gid=uid)
        os.chown(self.root, *self.ids)
        if self.spec.own:
            # Unset limits: the whole host (still a cgroup of its own, with the pids cap).
            memory = self.spec.memory_limit_mib or (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20)
            cpus = self.spec.cpu_quota or float(os.cpu_count() or 1)
            self.cgroups = sandbox.limit(journal, self.id, memory_mib=memory, cpus=cpus)
            entries.append(journal.entries[-1])  # the "jail-cgroup" entry limit() recorded
            self.close()
            self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return entries

    def connect_path(self, name: str) -> Path:
        """Where dispo reaches the socket `name` firecracker bound in its working directory: through a
        descriptor of the jail directory, so the address fits a unix socket's 108 bytes however deep the
        workspace is (firecracker itself binds the short relative name)."""
        if self._root_fd < 0:
            return self.root / name
        return Path(f"/proc/self/fd/{self._root_fd}") / name

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def sandbox_args(self) -> tuple[list[str], list[str]]:
        """Dispo's own sandbox: (setpriv options, the wrapper run as root before them)."""
        uid = self.ids[0]
        return sandbox.drop_args(uid, kvm=False), [*sandbox.hide_host(), *sandbox.private_dev(uid)]

    def place(self, src: Path, name: str, *, writable: bool) -> Path:
        """Put `src` into the chroot as /name, readable (or writable) by the jail user; return /name.

        A writable file (the session disk) is hard-linked so the guest writes the session's own disk;
        a read-only one (the kernel, possibly shared by an image) is reflinked or copied, because
        chown on a hard link would change the shared original.
        """
        # The chroot belongs to the jail user, whose firecracker may already run and plant links: every
        # operation here is on a descriptor opened with O_NOFOLLOW (a new name made with O_EXCL), never a
        # path root would follow out of the jail.
        dest = self.root / name
        dest.unlink(missing_ok=True)
        if writable:
            try:
                os.link(src, dest, follow_symlinks=False)
                self._own(dest, 0o600)
                return self.inside(name)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with open(src, "rb") as s:
                try:
                    fcntl.ioctl(fd, files.FICLONE, s.fileno())
                except OSError:
                    os.ftruncate(fd, 0)
                    with os.fdopen(os.dup(fd), "wb") as d:
                        shutil.copyfileobj(s, d, 1 << 20)
            os.fchown(fd, *self.ids)
            os.fchmod(fd, 0o600 if writable else 0o400)
        finally:
            os.close(fd)
        return self.inside(name)

    def make_file(self, inside: Path) -> Path:
        """An empty file for firecracker to write (its log, metrics), made fresh and handed to the jail user
        by descriptor: whatever stood at that name (a link the jailed process planted) is removed, never
        followed. Returns its host path."""
        path = self.host(inside)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(fd, *self.ids)
        finally:
            os.close(fd)
        return path

    def take_out(self, inside: Path, dest: Path) -> None:
        """Move a file the jailed firecracker wrote (a snapshot) out of the chroot: read through an O_NOFOLLOW
        descriptor that must be a regular file (a planted link is refused, never followed), written to a new
        root-only `dest` (a reflink where the filesystem allows), then removed from the jail."""
        src = self.host(inside)
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VmmError(f"{src} in the jail is not a regular file", hint="the jailed VMM misbehaved")
            dest.unlink(missing_ok=True)
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.ioctl(out, files.FICLONE, fd)
                except OSError:
                    os.ftruncate(out, 0)
                    with os.fdopen(os.dup(fd), "rb") as r, os.fdopen(os.dup(out), "wb") as w:
                        shutil.copyfileobj(r, w, 1 << 20)
            finally:
                os.close(out)
        finally:
            os.close(fd)
        src.unlink()

    def _own(self, path: Path, mode: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, *self.ids)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def argv(self, firecracker_args: Sequence[str]) -> list[str]:
        if self.spec.own:  # firecracker itself, run from the jail directory (see sandbox_args)
            return [str(self.spec.firecracker), "--api-sock", str(self.inside(SOCKET_INSIDE.name)), "--id", self.id,
                    *firecracker_args]
        argv = [str(self.spec.jailer), "--id", self.id, "--exec-file", str(self.spec.firecracker),
                "--uid", str(self.ids[0]), "--gid", str(self.ids[1]),
                "--chroot-base-dir", str(self.spec.chroot_base),
                "--cgroup-version", str(self.version), "--parent-cgroup", PARENT_CGROUP, *self.cgroup_args]
        if self.spec.netns is not None:
            argv += ["--netns", str(self.spec.netns)]
        return [*argv, "--", "--api-sock", str(SOCKET_INSIDE), *firecracker_args]


_TUNSETIFF, _TUNSETOWNER, _TUNSETGROUP = 0x400454CA, 0x400454CC, 0x400454CE
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000


def set_tap_owner(tap: str, uid: int, gid: int) -> None:
    """Let `uid`/`gid` open the existing persistent tap (TUNSETOWNER/TUNSETGROUP, as `ip tuntap add user`)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise VmmError(f"cannot open /dev/net/tun to hand tap {tap} to the jail: {e.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
        fcntl.ioctl(fd, _TUNSETOWNER, uid)
        fcntl.ioctl(fd, _TUNSETGROUP, gid)
    except OSError as e:
        raise VmmError(f"cannot hand tap {tap} to the jail user {uid}: {e.strerror}",
                       hint="the tap must exist, be a tap (not tun) and not be in use") from None
    finally:
        os.close(fd)


@undoer("jail-cgroup")
def undo_jail_cgroup(args: Mapping[str, str]) -> None:
    remove_cgroups([Path(p) for p in args["dirs"].split(":") if p])
