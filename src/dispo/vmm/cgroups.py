"""Where this process's mount namespace has the cgroup hierarchy: read from /proc/self/mountinfo, not assumed.

`/sys/fs/cgroup` is only a convention: `ip netns exec` remounts /sys fresh (no cgroup mounts under it), a
container may mount cgroup2 elsewhere, a hybrid host has v1 controllers beside a controller-less cgroup2.
`find_hierarchy()` answers with the mounts that hold the controllers a VMM's limits need, or raises one line
that says what is missing and how to get it. vmm/sandbox.py (QEMU's limits) and vmm/firecracker/jailer.py
(the jailer's) both ask it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dispo.errors import VmmError

MOUNTINFO = Path("/proc/self/mountinfo")
MOUNTINFO_CAP = 1 << 20  # a mount table far past any real one is not read further
CONTROLLERS = ("memory", "cpu", "pids")
PARENT_CGROUP = "dispo"  # every VMM's cgroup is <hierarchy>/dispo/<name>; the parent stays

MOUNT_HINT = ("mount the cgroup hierarchy in this mount namespace (e.g. 'mount -t cgroup2 none /sys/fs/cgroup', "
              "or bind-mount the host's /sys/fs/cgroup), or run dispo outside 'ip netns exec' and 'unshare -m'")


@dataclass(frozen=True)
class Hierarchy:
    """v2: one unified mount (`mounts[""]`); v1: one mount per controller."""

    version: int
    mounts: dict[str, Path]

    def dirs(self, relative: str, controllers: Iterable[str]) -> list[Path]:
        """The directories of the cgroup `relative` (e.g. "dispo/s-1") for these controllers."""
        if self.version == 2:
            return [self.mounts[""] / relative]
        return [self.mounts[c] / relative for c in dict.fromkeys(controllers)]

    @property
    def root(self) -> Path:
        """v2: the unified mount point (where subtree_control starts)."""
        return self.mounts[""]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> tuple[Path | None, dict[str, Path]]:
    """(the first cgroup2 mount point, {v1 controller: its mount point}) from mountinfo's text."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        fstype, mount_point = after[0], Path(_unescape(fields[4]))
        if fstype == "cgroup2" and unified is None:
            unified = mount_point
        elif fstype == "cgroup":
            for option in after[2].split(","):
                v1.setdefault(option, mount_point)
    return unified, v1


def choose(unified: Path | None, v1: dict[str, Path], controllers: Sequence[str] = CONTROLLERS) -> Hierarchy:
    """v1 when every wanted controller has a v1 mount (a hybrid host keeps them there), else the unified
    hierarchy; neither: a one-line error naming what is missing."""
    if controllers and all(c in v1 for c in controllers):
        return Hierarchy(1, {c: v1[c] for c in controllers})
    if unified is not None:
        return Hierarchy(2, {"": unified})
    missing = ", ".join(c for c in controllers if c not in v1)
    what = ("no cgroup hierarchy is mounted in this mount namespace" if not v1 else
            f"no cgroup2 hierarchy, and no cgroup v1 mount for the {missing} controller(s)")
    raise VmmError(f"cannot limit the VMM's memory, CPU and processes: {what} ({MOUNTINFO} lists none)",
                   hint=MOUNT_HINT)


def find_hierarchy(controllers: Sequence[str] = CONTROLLERS, mountinfo: Path = MOUNTINFO) -> Hierarchy:
    """The cgroup mounts for `controllers`, from this process's mount table. Raises VmmError (one line)."""
    try:
        with mountinfo.open("rb") as f:
            text = f.read(MOUNTINFO_CAP).decode(errors="replace")
    except OSError as e:
        raise VmmError(f"cannot read {mountinfo} to find the cgroup hierarchy: {e.strerror}",
                       hint="dispo needs /proc mounted") from None
    return choose(*parse_mountinfo(text), controllers)


def remove_cgroups(dirs: Sequence[Path], timeout: float = 3.0) -> None:
    """rmdir each cgroup directory (only possible once its processes are gone); missing ones are fine.

    Right after the last task exits, the kernel may still report the cgroup busy for a moment: retry.
    """
    deadline = time.monotonic() + timeout
    for d in dirs:
        while True:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise
            break
