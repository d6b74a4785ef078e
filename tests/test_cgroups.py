"""vmm/cgroups.py: the cgroup hierarchy found from the mount table, or one line saying what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispo.errors import VmmError
from dispo.vmm import cgroups

# The fixed part of a mountinfo line before the mount point, and what follows it.
_HEAD = "31 23 0:28 / "
_OPTS = " rw,relatime - "

HYBRID = "\n".join([
    "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw",
    _HEAD + "/sys/fs/cgroup" + _OPTS + "tmpfs tmpfs rw,mode=755",
    _HEAD + "/sys/fs/cgroup/cpu,cpuacct" + _OPTS + "cgroup cgroup rw,cpu,cpuacct",
    _HEAD + "/sys/fs/cgroup/memory" + _OPTS + "cgroup cgroup rw,memory",
    _HEAD + "/sys/fs/cgroup/pids" + _OPTS + "cgroup cgroup rw,pids",
    _HEAD + "/sys/fs/cgroup/systemd" + _OPTS + "cgroup cgroup rw,name=systemd",
    _HEAD + "/sys/fs/cgroup/unified" + _OPTS + "cgroup2 cgroup2 rw",
])


def _mountinfo(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "mountinfo"
    f.write_text(text + "\n")
    return f


def test_v2_mounted_elsewhere_is_found(tmp_path: Path) -> None:
    text = "\n".join(["22 1 0:21 / /sys rw - sysfs sysfs rw",
                      _HEAD + r"/srv/my\040cgroups" + _OPTS + "cgroup2 cgroup2 rw,nsdelegate"])
    h = cgroups.find_hierarchy(mountinfo=_mountinfo(tmp_path, text))
    assert (h.version, h.root) == (2, Path("/srv/my cgroups"))
    assert h.dirs("dispo/qemu-x", cgroups.CONTROLLERS) == [Path("/srv/my cgroups/dispo/qemu-x")]


def test_hybrid_host_uses_the_v1_controllers(tmp_path: Path) -> None:
    h = cgroups.find_hierarchy(mountinfo=_mountinfo(tmp_path, HYBRID))
    assert h.version == 1
    assert h.dirs("dispo/j", ["memory", "cpu", "pids"]) == [
        Path("/sys/fs/cgroup/memory/dispo/j"), Path("/sys/fs/cgroup/cpu,cpuacct/dispo/j"),
        Path("/sys/fs/cgroup/pids/dispo/j")]


def test_no_cgroup_mounted_is_one_line_naming_it(tmp_path: Path) -> None:
    """What `ip netns exec` leaves: a fresh sysfs, no cgroup mount at all."""
    text = "\n".join(["22 1 0:21 / /sys rw - sysfs sysfs rw", "23 1 0:5 / /proc rw - proc proc rw"])
    with pytest.raises(VmmError) as e:
        cgroups.find_hierarchy(mountinfo=_mountinfo(tmp_path, text))
    line = e.value.one_line()
    assert "\n" not in line
    assert "no cgroup hierarchy is mounted" in line and "mount -t cgroup2" in line


def test_v1_without_a_needed_controller_names_it(tmp_path: Path) -> None:
    text = "\n".join(line for line in HYBRID.splitlines() if "pids" not in line and "cgroup2" not in line)
    with pytest.raises(VmmError, match=r"no cgroup v1 mount for the pids controller"):
        cgroups.find_hierarchy(mountinfo=_mountinfo(tmp_path, text))


def test_this_host_has_a_hierarchy() -> None:
    h = cgroups.find_hierarchy()
    assert all(d.is_dir() for d in h.dirs("", cgroups.CONTROLLERS))
