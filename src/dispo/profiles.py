"""App profiles: what `dispo run NAME [URL]` boots and runs, from one TOML file per app.

Lookup: <profiles_dir>/NAME.toml (config `profiles_dir`, default /etc/dispo/profiles) first, then the
built-in profiles shipped in dispo/builtin_profiles/ (firefox, chromium). Unknown keys and bad values are
errors naming the key and the file. The session settings a profile may set, their limits and the default of
one it leaves out are settings.py's (a profile must name its image, though: that default is for a plain
`dispo run -- CMD`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dispo.config import show
from dispo.errors import InvalidInput, NotFound
from dispo.features import PROFILE_KEYS as FEATURE_KEYS
from dispo.features import Features
from dispo.names import check_name
from dispo.net.policy import NetworkPolicy
from dispo.privacy import Privacy
from dispo.settings import INT_SETTINGS, SECONDS_SETTINGS, SETTINGS, accepts, limits_text

BUILTIN_DIR = Path(__file__).parent / "builtin_profiles"
DEFAULT_PROFILES_DIR = Path("/etc/dispo/profiles")


class DisplayMode(StrEnum):
    WEB = "web"    # noVNC viewer on 127.0.0.1 with a per-session token
    X11 = "x11"    # X11 forwarding over the session's SSH to the host's $DISPLAY
    NONE = "none"  # no display: a command or a shell


@dataclass(frozen=True)
class Profile:
    name: str
    image: str
    command: tuple[str, ...] = ()
    memory_mib: int = int(SETTINGS["memory_mib"].default)
    vcpus: int = int(SETTINGS["vcpus"].default)
    shm_mib: int = int(SETTINGS["shm_mib"].default)
    start_page: str = ""
    display: DisplayMode = DisplayMode.NONE
    backend: str = str(SETTINGS["backend"].default)
    ready_timeout_s: float = float(SETTINGS["ready_timeout_s"].default)
    idle_timeout_s: float = float(SETTINGS["idle_timeout_s"].default)
    max_lifetime_s: float = float(SETTINGS["max_lifetime_s"].default)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    privacy: Privacy = field(default_factory=Privacy)
    features: Features = field(default_factory=Features)  # clipboard, downloads, uploads, audio, keep_path
    # The debugging protocol the app speaks when a session asks for automation (one of AUTOMATION); "" = none.
    automation: str = ""
    source: str = ""

    def argv(self, url: str | None = None, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The command to run in the guest, with `extra` options and the URL (or the start page) appended."""
        target = url or self.start_page
        return (*self.command, *extra, target) if target else (*self.command, *extra)


# The protocols an app's profile may name as its `automation`: Chromium's DevTools protocol, WebDriver BiDi.
AUTOMATION = ("cdp", "bidi")




def _bad(where: str, key: str, what: str) -> InvalidInput:
    return InvalidInput(f"{where}: key '{key}' {what}", hint="fix the profile file")


def parse(name: str, data: dict[str, Any], where: str) -> Profile:
    known = {f for f in Profile.__dataclass_fields__ if f not in ("name", "source", "features")} | set(FEATURE_KEYS)
    for key in data:
        if key not in known:
            raise InvalidInput(f"{where}: unknown key '{key}'", hint=f"known keys: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    if not isinstance(data.get("image"), str):
        raise _bad(where, "image", "must name an image (see 'dispo image ls')")
    kwargs["image"] = check_name(data["image"], what=f"image name in {where}")
    for key in INT_SETTINGS:
        if key in data:
            v = data[key]
            if not isinstance(v, int) or isinstance(v, bool) or not accepts(key, v):
                raise _bad(where, key, f"must be an integer from {limits_text(key)}, got {show(v)}")
            kwargs[key] = v
    if "command" in data:
        cmd = data["command"]
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd):
            raise _bad(where, "command", "must be a non-empty list of strings (argv, no shell)")
        kwargs["command"] = tuple(cmd)
    for key in ("start_page", "backend", "automation"):
        if key in data:
            if not isinstance(data[key], str):
                raise _bad(where, key, "must be a string")
            kwargs[key] = data[key]
    backends = SETTINGS["backend"].choices
    if kwargs.get("backend", SETTINGS["backend"].default) not in backends:
        raise _bad(where, "backend", f"is {kwargs['backend']!r}, expected one of: {', '.join(backends)}")
    if kwargs.get("automation", "") not in ("", *AUTOMATION):
        raise _bad(where, "automation", f"is {kwargs['automation']!r}, expected one of: {', '.join(AUTOMATION)}")
    if "display" in data:
        try:
            kwargs["display"] = DisplayMode(data["display"])
        except ValueError:
            raise _bad(where, "display", f"is {data['display']!r}, expected one of: web, x11, none") from None
    for key in SECONDS_SETTINGS:
        if key in data:
            secs = data[key]
            if not isinstance(secs, int | float) or isinstance(secs, bool) or not accepts(key, secs):
                raise _bad(where, key, f"must be a number of seconds from {limits_text(key)}, got {show(secs)}")
            kwargs[key] = float(secs)
    if "network" in data:
        if not isinstance(data["network"], dict):
            raise _bad(where, "network", "must be a table")
        kwargs["network"] = NetworkPolicy.from_mapping(data["network"], where=f"{where}: [network]")
    if "privacy" in data:
        if not isinstance(data["privacy"], dict):
            raise _bad(where, "privacy", "must be a table")
        kwargs["privacy"] = Privacy.from_mapping(data["privacy"], where=f"{where}: [privacy]")
    kwargs["features"] = Features.from_profile(data, where=where)
    return Profile(name=name, source=where, **kwargs)


def load_file(path: Path) -> Profile:
    name = check_name(path.stem, what="profile name")
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read profile {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{path}: not valid TOML: {e}", hint="fix the profile file") from None
    return parse(name, data, str(path))


def find(name: str, profiles_dir: Path = DEFAULT_PROFILES_DIR) -> Profile:
    check_name(name, what="profile name")
    for d in (profiles_dir, BUILTIN_DIR):
        path = d / f"{name}.toml"
        if path.is_file():
            return load_file(path)
    raise NotFound(f"no profile named {name!r}",
                   hint=f"built-in profiles: {', '.join(sorted(list_names(profiles_dir)))}; "
                        f"add your own as {profiles_dir}/{name}.toml")


def list_names(profiles_dir: Path = DEFAULT_PROFILES_DIR) -> set[str]:
    names: set[str] = set()
    for d in (BUILTIN_DIR, profiles_dir):
        if d.is_dir():
            names |= {p.stem for p in d.glob("*.toml")}
    return names
