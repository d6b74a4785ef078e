"""What a session tells its guest about the user, and which quiet-browser settings it turns back on.

A disposable browser should fit the user (their time zone and language, so pages look right) without
identifying them (nothing of the host's name or user reaches the guest: the guest is `dispo-<session>`, its
user is `user`). The profile's `[privacy]` table:

    [privacy]
    timezone = "host"       # or an IANA name ("Europe/Berlin", "UTC"); "host": the host's, else UTC
    language = "host"       # or a BCP 47 tag ("de-DE"); "host": from $LC_ALL/$LC_MESSAGES/$LANG, else en-US
    quiet = true            # false: none of the quiet settings (docs/quiet.md); a baseline, not for use
    safe_browsing = false   # true: the browser's safe-browsing lookups and list downloads (a request to
                            # Google or Mozilla for sites and downloads; a security feature with a privacy cost)

They reach the guest as kernel arguments (`dispo.tz`, `dispo.lang`, `dispo.quiet`, `dispo.allow`), read by
its init and, in browser images, by browser-setup.sh.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispo.errors import InvalidInput

HOST = "host"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_LANGUAGE = "en-US"
ALLOWANCES = ("safe_browsing",)  # quiet settings a profile may turn back on; each a bool key, False by default
_TZ_RE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+){0,2}$")
_LANG_RE = re.compile(r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?$")
_POSIX_LANG_RE = re.compile(r"^([a-z]{2,3})(_([A-Z]{2}))?([.@].*)?$")


@dataclass(frozen=True)
class Privacy:
    timezone: str = HOST
    language: str = HOST
    quiet: bool = True
    safe_browsing: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str) -> Privacy:
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise InvalidInput(f"{where}: unknown key '{key}'", hint=f"known keys: {', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        for key in ("quiet", *ALLOWANCES):
            if key in data:
                if not isinstance(data[key], bool):
                    raise InvalidInput(f"{where}: key '{key}' must be true or false", hint="fix the profile file")
                kwargs[key] = data[key]
        for key, check in (("timezone", check_timezone), ("language", check_language)):
            if key in data:
                value = data[key]
                if not isinstance(value, str):
                    raise InvalidInput(f"{where}: key '{key}' must be a string", hint="fix the profile file")
                kwargs[key] = value if value == HOST else check(value, where=f"{where}: key '{key}'")
        return cls(**kwargs)

    def allowed(self) -> tuple[str, ...]:
        """The quiet settings turned back on, as the guest names them (safe_browsing -> safe-browsing)."""
        return tuple(a.replace("_", "-") for a in ALLOWANCES if getattr(self, a))


def check_timezone(name: str, *, where: str = "timezone") -> str:
    if len(name) > 64 or not _TZ_RE.match(name) or ".." in name:
        raise InvalidInput(f"{where}: {name[:64]!r} is not a time zone name",
                           hint="give an IANA name such as Europe/Berlin or UTC (see /usr/share/zoneinfo)")
    return name


def check_language(tag: str, *, where: str = "language") -> str:
    if not _LANG_RE.match(tag):
        raise InvalidInput(f"{where}: {tag[:32]!r} is not a language tag",
                           hint="give a BCP 47 tag such as en-US, de-DE or fr")
    return tag


def host_timezone(env: Mapping[str, str] | None = None, root: Path = Path("/")) -> str:
    """The host's time zone name: $TZ (a name, not a path or POSIX rule), /etc/timezone, or the zone
    /etc/localtime links to; UTC when none of these names one."""
    env = os.environ if env is None else env
    candidates = [env.get("TZ", "").removeprefix(":")]
    with contextlib.suppress(OSError):
        candidates.append((root / "etc/timezone").read_text().strip())
    with contextlib.suppress(OSError):
        candidates.append(os.readlink(root / "etc/localtime").partition("zoneinfo/")[2])
    for c in candidates:
        if c and _TZ_RE.match(c) and ".." not in c and len(c) <= 64:
            return c
    return DEFAULT_TIMEZONE


def host_language(env: Mapping[str, str] | None = None) -> str:
    """The host's language as a BCP 47 tag, from the first set of $LC_ALL, $LC_MESSAGES, $LANG
    (de_DE.UTF-8 -> de-DE); en-US for C, POSIX or none."""
    env = os.environ if env is None else env
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(var, "")
        if not value:
            continue
        m = _POSIX_LANG_RE.match(value)
        if m is None:
            return DEFAULT_LANGUAGE  # C, POSIX, C.UTF-8 or something unreadable: the usual default
        return m.group(1) + (f"-{m.group(3)}" if m.group(3) else "")
    return DEFAULT_LANGUAGE


def resolve(p: Privacy, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(time zone, language) for a session: the profile's, or the host's for "host"."""
    tz = host_timezone(env) if p.timezone == HOST else p.timezone
    lang = host_language(env) if p.language == HOST else p.language
    return tz, lang
