"""What a session's VMM runs as: its own unprivileged uid/gid, no capabilities, no new privileges, and only
the files it was handed as open descriptors.

Each session gets a uid/gid of its own (UID_BASE + a slot), claimed by an O_EXCL file `<state_dir>/vmm-ids/
<uid>` that names the session, journaled (kind "vmm-id") before it is made; a guest that breaks out of its
VMM is an unprivileged user that shares nothing with other sessions, not root and not the shared `nobody`.
dispo (root) opens what the VMM needs (kernel, initrd, the session disk, the tap, the control socket) with
O_NOFOLLOW and passes the descriptors; the VMM opens no path of the host's it could be tricked into.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from dispo.errors import PermissionProblem
from dispo.infra.journal import Journal
from dispo.infra.undo import undoer
from dispo.vmm.cgroups import PARENT_CGROUP, find_hierarchy, remove_cgroups

UID_BASE = 1 << 30          # far above any user or system account (and below 2^31: ioctls take a signed int)
SLOTS = 1 << 20
IDS_DIR = "vmm-ids"
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000


def allocate_id(journal: Journal, state_dir: Path, session_id: str) -> int:
    """A uid (== gid) for this session's VMMs, recorded before its claim file exists; one per session, so a
    VMM restored from a snapshot in the same session runs as the same uid (the tap is handed to it)."""
    for entry in journal.entries:
        if entry.kind == "vmm-id" and id_claimed(entry.args):
            return int(Path(entry.args["path"]).name)
    d = state_dir / IDS_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    first = int(session_id, 16) % SLOTS
    for i in range(256):
        uid = UID_BASE + (first + i) % SLOTS
        path = d / str(uid)
        journal.record("vmm-id", path=str(path), session=session_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue  # another live session's; the entry's undo leaves a file that names another session
        with os.fdopen(fd, "w") as f:
            f.write(session_id + "\n")
        return uid
    raise PermissionProblem("no free VMM uid for this session", hint="run 'dispo gc'; too many sessions at once?")


@undoer("vmm-id")
def undo_vmm_id(args: Mapping[str, str]) -> None:
    path = Path(args["path"])
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() == args["session"]:
            path.unlink()


def id_claimed(args: Mapping[str, str]) -> bool:
    try:
        return Path(args["path"]).read_text().strip() == args["session"]
    except OSError:
        return False


def drop_args(uid: int, *, kvm: bool) -> list[str]:
    """setpriv options: become uid/gid, keep no capability (not even in the bounding set), no new privileges;
    the only supplementary group is `kvm` when the VMM needs /dev/kvm."""
    groups = ["--clear-groups"]
    if kvm:
        with contextlib.suppress(KeyError):
            groups = ["--groups", str(grp.getgrnam("kvm").gr_gid)]
    return ["--reuid", str(uid), "--regid", str(uid), *groups, "--inh-caps=-all", "--bounding-set=-all",
            "--no-new-privs"]


# What the VMM's own mount namespace hides under empty tmpfs: every place on the host where data lives (homes,
# /tmp, /var with dispo's workspace and images, /run with the state dir, /srv, /mnt, /media, /opt). It keeps
# /usr (its binary, libraries, firmware), /etc (nothing there is readable by its uid that matters), /dev and
# /proc (its descriptors: /proc/self/fd). Files it needs come as descriptors, which no mount hides.
HIDDEN = ("/home", "/root", "/tmp", "/var", "/run", "/srv", "/mnt", "/media", "/opt")
_HIDE = ('for d in "$@"; do [ "$d" = -- ] && break; [ -d "$d" ] || { shift; continue; }; '
         'mount -t tmpfs -o mode=755,nosuid,nodev,noexec,size=16k dispo-hidden "$d" || exit 96; shift; done; '
         'shift; exec "$@"')


def hide_host(extra: tuple[str, ...] = ()) -> list[str]:
    """A wrapper (run as root, before privileges are dropped) that gives the VMM a private mount namespace
    with the host's data hidden, then execs its argv (same pid)."""
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _HIDE, "hide-host",
            *HIDDEN, *extra, "--"]


# A /dev of the VMM's own (a wrapper after hide_host, still root): an empty tmpfs over the host's /dev with only
# the nodes a VMM that opens its devices by path needs (Firecracker: /dev/kvm, /dev/net/tun), owned by its uid,
# and the harmless /dev/null and /dev/urandom. The host's nodes stay root-only; nothing else of /dev is seen.
_DEV = ('mount -t tmpfs -o mode=755,nosuid,noexec,size=64k dispo-dev /dev && mkdir /dev/net || exit 96; '
        'while [ "$1" != -- ]; do mknod -m "$2" "$1" c "$3" "$4" && chown "$5:$5" "$1" || exit 96; '
        'shift 5; done; shift; exec "$@"')
_PRIVATE_DEVICES = (("/dev/null", "666", False), ("/dev/urandom", "444", False), ("/dev/kvm", "600", True),
                    ("/dev/net/tun", "600", True))


def private_dev(uid: int) -> list[str]:
    """A wrapper (inside hide_host's namespace, before privileges are dropped) that gives the VMM a /dev of its
    own: the devices it needs, `uid`'s alone where they grant anything (kvm, tun), then execs its argv."""
    nodes: list[str] = []
    for path, mode, owned in _PRIVATE_DEVICES:
        rdev = os.stat(path).st_rdev
        nodes += [path, mode, str(os.major(rdev)), str(os.minor(rdev)), str(uid if owned else 0)]
    return ["/bin/sh", "-c", _DEV, "private-dev", *nodes, "--"]


def open_file(path: Path, *, write: bool = False) -> int:
    """An O_NOFOLLOW descriptor of path for the VMM (closed in dispo once handed over)."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags)


def open_tap(name: str) -> int:
    """A descriptor attached to the existing tap `name` (what QEMU would open itself as root)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


# -- resource limits --------------------------------------------------------------------------------------
PIDS_MAX = 512  # QEMU's threads (vCPUs, I/O, RCU) stay far below; a fork bomb in the VMM does not


def limit(journal: Journal, name: str, *, memory_mib: int, cpus: float) -> list[Path]:
    """A cgroup of its own for one VMM (memory, CPU, pids limits), journaled (kind "jail-cgroup", the undo
    that removes cgroups) before it exists; a leftover of the same name is removed first. Returns the
    directories whose `cgroup.procs` the VMM's pid goes into (`place`), before the VMM runs."""
    hierarchy = find_hierarchy()  # one line naming what is missing when no hierarchy is mounted here
    version = hierarchy.version
    period = 100_000
    values = {"memory": {"memory.max" if version == 2 else "memory.limit_in_bytes": str(memory_mib << 20)},
              "cpu": ({"cpu.max": f"{int(cpus * period)} {period}"} if version == 2 else
                      {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(int(cpus * period))}),
              "pids": {"pids.max": str(PIDS_MAX)}}
    dirs = hierarchy.dirs(f"{PARENT_CGROUP}/{name}", values)
    if version == 2:
        settings = [{k: v for group in values.values() for k, v in group.items()}]
    else:
        settings = list(values.values())
    journal.record("jail-cgroup", dirs=":".join(str(d) for d in dirs))
    remove_cgroups(dirs)
    for d, wanted in zip(dirs, settings, strict=True):
        if version == 2:
            for parent in (hierarchy.root, hierarchy.root / PARENT_CGROUP):
                parent.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):  # controllers a parent cannot give are refused below
                    (parent / "cgroup.subtree_control").write_text("+memory +cpu +pids")
        for key, value in wanted.items():
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / key).write_text(value)
            except OSError as e:
                raise PermissionProblem(f"cannot set {key} for the VMM's cgroup {d}: {e.strerror}",
                                        hint="dispo needs the memory, cpu and pids cgroup controllers") from None
    return dirs


def place(dirs: list[Path], pid: int) -> None:
    for d in dirs:
        (d / "cgroup.procs").write_text(str(pid))
