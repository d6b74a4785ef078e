"""The one table of a session's settings: defaults and limits shared by profiles, CLI flags and the API.

Each setting's default, limits, unit and meaning are stated here and nowhere else. `dispo run`'s options
(cli/run.py), the API's request schema (web/openapi.py), the keys a profile file may set (profiles.py) and
the request's checks (runtime/request.py) are all made from this table; tests/test_settings.py checks that
they say the same and that no other module writes a default of its own. This module imports nothing of dispo:
every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    default: float | int | str  # its type is the setting's: int (whole numbers), float (seconds), str
    lo: float = 0
    hi: float = 0
    unit: str = ""              # "MiB", "s"; a numeric setting's key ends in it (memory_mib, ready_timeout_s)
    help: str = ""              # what it is, for people: a flag's help, the schema's description, an error's hint
    # What 0 means when it means something of its own ("never", "the guest's default"); 0 is then accepted
    # even below `lo`.
    zero: str = ""
    choices: tuple[str, ...] = ()  # a string setting's values; none: a name (of an image)

    @property
    def integer(self) -> bool:
        return isinstance(self.default, int)

    @property
    def number(self) -> bool:
        return not isinstance(self.default, str)


def meminfo_mib(key: str, default: int) -> int:
    """One /proc/meminfo field of this host in MiB ("MemTotal", "MemAvailable"), or `default` without it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return default


def host_memory_mib() -> int:
    """MemTotal of this host in MiB (a guest bigger than the host is refused up front)."""
    return meminfo_mib("MemTotal", 1 << 20)


WEEK_S = 7 * 86400.0

SETTINGS: dict[str, Setting] = {
    "image": Setting("minimal", help="image to boot"),
    # The backends are vmm/base.py VmmKind's values (tests/test_settings.py checks); auto: the image's first.
    "backend": Setting("auto", help="VMM to run the guest in; auto: the first the image is built for",
                       choices=("auto", "qemu", "firecracker")),
    "memory_mib": Setting(512, 64, 1 << 20, "MiB", "guest memory in MiB"),
    "vcpus": Setting(1, 1, 64, "", "guest vCPUs"),
    # 0 adds no dispo.shm= to the kernel command line: the guest's tmpfs default, half its memory. Profiles
    # that run a browser set their own (builtin_profiles/).
    "shm_mib": Setting(0, 16, 1 << 20, "MiB", "size of the guest's /dev/shm in MiB",
                       zero="the guest's default, half its memory"),
    "ready_timeout_s": Setting(120.0, 1, 3600, "s", "seconds to wait for the guest's SSH and the app's display"),
    "idle_timeout_s": Setting(0.0, 0, WEEK_S, "s", "end the session after this many seconds without use",
                              zero="never"),
    "max_lifetime_s": Setting(0.0, 0, WEEK_S, "s", "end the session this many seconds after it started",
                              zero="never"),
}

INT_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.integer)
SECONDS_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.number and not s.integer)


def limit_hi(key: str) -> float:
    """The upper limit of a numeric setting; guest memory is also bounded by this host's memory."""
    hi = SETTINGS[key].hi
    if key == "memory_mib":
        hi = min(hi, host_memory_mib())
    return hi


def accepts(key: str, value: float) -> bool:
    """`value` (a number of the setting's type) is within its limits, or is its documented 0."""
    s = SETTINGS[key]
    return s.lo <= value <= limit_hi(key) or (value == 0 and bool(s.zero))


def text(value: float | str) -> str:
    """A value as people write it: 120.0 is 120, 1048576 is not 1.04858e+06."""
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def limits_text(key: str) -> str:
    """'64 to 7936', '16 to 1048576, or 0', 'auto, qemu or firecracker'; '' for a name."""
    s = SETTINGS[key]
    if s.choices:
        return f"{', '.join(s.choices[:-1])} or {s.choices[-1]}"
    if not s.number:
        return ""
    extra = ", or 0" if s.zero and s.lo > 0 else ""
    return f"{text(s.lo)} to {text(limit_hi(key))}{extra}"


def describe(key: str, *, limits: bool = True) -> str:
    """A setting for people: 'guest memory in MiB (default 512, or the profile's; 64 to 7936)', and what its 0
    means ('...; 0: never (default 0, ...)')."""
    s = SETTINGS[key]
    zero = f"; 0: {s.zero}" if s.zero else ""
    tail = f"; {limits_text(key)}" if limits and s.number else ""
    return f"{s.help}{zero} (default {text(s.default)}, or the profile's{tail})"
