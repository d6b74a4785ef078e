"""The one table of a session's settings: defaults and limits shared by profiles, CLI flags and the API.

Nothing else states a default memory size or a vCPU limit; `runtime/request.py` validates against this
table and `profiles.py` checks profile files against it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    default: float | int | str
    lo: float = 0
    hi: float = 0
    unit: str = ""
    help: str = ""


def host_memory_mib() -> int:
    """MemTotal of this host in MiB (a guest bigger than the host is refused up front)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1 << 20


WEEK_S = 7 * 86400.0

SETTINGS: dict[str, Setting] = {
    "image": Setting("minimal", help="image to boot when no profile names one"),
    "backend": Setting("auto", help="auto | qemu | firecracker"),
    "memory_mib": Setting(512, 64, 1 << 20, "MiB", "guest memory"),
    "vcpus": Setting(1, 1, 64, "", "guest vCPUs"),
    "shm_mib": Setting(256, 16, 1 << 20, "MiB", "size of the guest's /dev/shm"),
    "ready_timeout_s": Setting(120.0, 1, 3600, "s", "seconds to wait for the guest's SSH and the app's display"),
    "idle_timeout_s": Setting(0.0, 0, WEEK_S, "s", "end the session after this long without use (0: never)"),
    "max_lifetime_s": Setting(0.0, 0, WEEK_S, "s", "end the session this long after it started (0: never)"),
}

INT_SETTINGS = ("memory_mib", "vcpus", "shm_mib")
SECONDS_SETTINGS = ("ready_timeout_s", "idle_timeout_s", "max_lifetime_s")


def limit_hi(key: str) -> float:
    """The upper limit of a numeric setting; guest memory is also bounded by this host's memory."""
    hi = SETTINGS[key].hi
    if key == "memory_mib":
        hi = min(hi, host_memory_mib())
    return hi
