"""What a session may move between its guest and the user, from the profile (every one under its policy):

    audio = false                 # true: the guest's sound plays in the viewer (a mute toggle); no microphone
    keep_path = ".config/chromium"  # what `dispo run PROFILE --keep NAME` keeps on the volume NAME

    [clipboard]
    to_guest = true               # the viewer (and PUT /v1/sessions/{id}/clipboard) may set the guest's clipboard
    from_guest = true             # the guest's clipboard reaches the viewer (and GET /v1/sessions/{id}/clipboard)
    max_bytes = 1048576           # longer text is refused (API) or cut by the guest's VNC server (viewer)

    [downloads]
    enabled = true                # what the guest's browser downloads can be fetched (API, viewer, --downloads)
    max_mib = 2048                # a bigger download is listed, never handed out
    total_mib = 8192              # what `--downloads DIR` copies in one session at most; then it stops, saying so
    total_files = 1000            # the files it copies in one session at most (each name at most 3 times)

    [uploads]
    enabled = true                # files may be put into the guest's ~/Uploads (API, viewer)
    max_mib = 512

They reach the guest as kernel arguments (its VNC server and browser enforce them as well: runtime/guestio.py
checks them host side first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispo.errors import InvalidInput

MIB = 1 << 20
_KEEP_PATH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,3}$")
# table -> key -> (field, type, lowest, highest)
_TABLES: dict[str, dict[str, tuple[str, type, int, int]]] = {
    "clipboard": {"to_guest": ("clipboard_to_guest", bool, 0, 1), "from_guest": ("clipboard_from_guest", bool, 0, 1),
                  "max_bytes": ("clipboard_max_bytes", int, 1, 16 * MIB)},
    "downloads": {"enabled": ("downloads", bool, 0, 1), "max_mib": ("downloads_max_mib", int, 1, 64 * 1024),
                  "total_mib": ("downloads_total_mib", int, 1, 1024 * 1024),
                  "total_files": ("downloads_total_files", int, 1, 100_000)},
    "uploads": {"enabled": ("uploads", bool, 0, 1), "max_mib": ("uploads_max_mib", int, 1, 64 * 1024)},
}


@dataclass(frozen=True)
class Features:
    clipboard_to_guest: bool = True
    clipboard_from_guest: bool = True
    clipboard_max_bytes: int = MIB
    downloads: bool = True
    downloads_max_mib: int = 2048
    downloads_total_mib: int = 8192     # --downloads DIR: bytes copied per session
    downloads_total_files: int = 1000   # --downloads DIR: files copied per session (bounds its record too)
    uploads: bool = True
    uploads_max_mib: int = 512
    audio: bool = False
    keep_path: str = ""       # below the guest user's home; "" = this profile keeps nothing

    @classmethod
    def from_profile(cls, data: Mapping[str, Any], *, where: str) -> Features:
        """The features of a profile's TOML (its top-level `audio`, `keep_path` and the three tables)."""
        kwargs: dict[str, Any] = {}
        for table, keys in _TABLES.items():
            if table not in data:
                continue
            values = data[table]
            if not isinstance(values, dict):
                raise InvalidInput(f"{where}: [{table}] must be a table", hint="fix the profile file")
            for key, value in values.items():
                if key not in keys:
                    raise InvalidInput(f"{where}: [{table}] unknown key '{key}'",
                                       hint=f"known keys: {', '.join(sorted(keys))}")
                name, typ, lo, hi = keys[key]
                if typ is bool and not isinstance(value, bool):
                    raise InvalidInput(f"{where}: [{table}] {key} must be true or false", hint="fix the profile file")
                if typ is int and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
                    raise InvalidInput(f"{where}: [{table}] {key} must be an integer from {lo} to {hi}, got {value!r}",
                                       hint="fix the profile file")
                kwargs[name] = value
        if "audio" in data:
            if not isinstance(data["audio"], bool):
                raise InvalidInput(f"{where}: key 'audio' must be true or false", hint="fix the profile file")
            kwargs["audio"] = data["audio"]
        if "keep_path" in data:
            kwargs["keep_path"] = check_keep_path(data["keep_path"], where=f"{where}: key 'keep_path'")
        return cls(**kwargs)

    def cmdline(self) -> tuple[str, ...]:
        """Kernel arguments for the guest (only what differs from the guest's defaults)."""
        args = []
        clip = ",".join(d for d, on in (("in", self.clipboard_to_guest), ("out", self.clipboard_from_guest)) if on)
        if clip != "in,out":
            args.append(f"dispo.clip={clip or 'none'}")
        if self.clipboard_max_bytes != MIB:
            args.append(f"dispo.clipmax={self.clipboard_max_bytes}")
        if not self.downloads:
            args.append("dispo.downloads=0")
        if self.audio:
            args.append("dispo.audio=1")
        return tuple(args)

    def to_json(self) -> dict[str, Any]:
        return {"clipboard": {"to_guest": self.clipboard_to_guest, "from_guest": self.clipboard_from_guest,
                              "max_bytes": self.clipboard_max_bytes},
                "downloads": {"enabled": self.downloads, "max_mib": self.downloads_max_mib,
                              "total_mib": self.downloads_total_mib, "total_files": self.downloads_total_files},
                "uploads": {"enabled": self.uploads, "max_mib": self.uploads_max_mib},
                "audio": self.audio}


# Top-level profile keys (besides the tables) that belong to Features.
PROFILE_KEYS = ("audio", "keep_path", *_TABLES)


def check_keep_path(value: Any, *, where: str) -> str:
    if not isinstance(value, str) or not _KEEP_PATH_RE.match(value) or any(p in (".", "..") for p in value.split("/")):
        raise InvalidInput(f"{where}: {str(value)[:80]!r} is not a path below the home directory",
                           hint='e.g. keep_path = ".config/chromium" (letters, digits, . _ - and /, no ..)')
    return value
