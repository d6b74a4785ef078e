"""SessionRequest: everything a session needs to know, fixed and fully checked before anything exists.

The CLI (flags), the service (a JSON body) and profiles all end here; `build()` is the one place that
applies defaults (settings.py, then the profile, then what the caller gave) and checks limits, names, the
URL, the image and the backend. A request that passes `build()` only fails later for reasons of the host
(no memory, a VMM that crashes), never for its own content.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dispo import guest, profiles
from dispo.config import Config, show
from dispo.errors import Conflict, InvalidInput, NotFound
from dispo.features import Features
from dispo.imagebuild.recipes import RECIPES
from dispo.names import check_name
from dispo.net.policy import NetworkPolicy
from dispo.privacy import Privacy, resolve
from dispo.profiles import DisplayMode
from dispo.settings import INT_SETTINGS, SECONDS_SETTINGS, SETTINGS, accepts, limit_hi, limits_text
from dispo.storage.images import Image, ImageStore
from dispo.vmm.base import VmmKind
from dispo.vmm.registry import choose_backend


class Stdio(StrEnum):
    CAPTURE = "capture"    # the command's output becomes OUTPUT events (the service; scripts)
    TERMINAL = "terminal"  # the caller's stdin (and with tty, its whole terminal): dispo run in-process


class StartMode(StrEnum):
    AUTO = "auto"    # restore from a current template that fits, else boot (and say why)
    COLD = "cold"    # always boot
    WARM = "warm"    # restore, or fail saying why not


MAX_URL = 4096
MAX_COMMAND_BYTES = 64 * 1024
_URL_RE = re.compile(r"^(https?://[^\s]+|about:[a-z-]+)$")
# Keys a JSON body (POST /v1/sessions) may carry; the rest of SessionRequest is the server's to decide.
API_KEYS = ("profile", "image", "command", "url", "display", "name", "backend", "start", "log_requests", "keep",
            "automation", "record", *INT_SETTINGS, *SECONDS_SETTINGS)
# What the app is started with when a session asks for automation, by the protocol its profile names. Both
# browsers listen on the guest's loopback only by default (Chromium ignores --remote-debugging-address unless
# headless; Firefox binds "localhost"), so nothing on any network reaches the port: dispod reaches it through
# the session's SSH (runtime/steps.py web_display).
AUTOMATION_OPTIONS = {"cdp": (f"--remote-debugging-port={guest.DEBUG_PORT}",),
                      "bidi": (f"--remote-debugging-port={guest.DEBUG_PORT}",)}


@dataclass(frozen=True)
class SessionRequest:
    image: str
    profile: str = ""                  # the profile it came from ("" for a plain image + command)
    command: tuple[str, ...] = ()      # the guest argv (for a profile: its app with the URL); () = a shell
    url: str = ""
    display: DisplayMode = DisplayMode.NONE
    name: str = ""
    # The session settings: defaults, limits and what a 0 means are settings.py's.
    backend: str = str(SETTINGS["backend"].default)
    memory_mib: int = int(SETTINGS["memory_mib"].default)
    vcpus: int = int(SETTINGS["vcpus"].default)
    shm_mib: int = int(SETTINGS["shm_mib"].default)
    ready_timeout_s: float = float(SETTINGS["ready_timeout_s"].default)
    idle_timeout_s: float = float(SETTINGS["idle_timeout_s"].default)
    max_lifetime_s: float = float(SETTINGS["max_lifetime_s"].default)
    policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    stdio: Stdio = Stdio.CAPTURE
    tty: bool = False                  # with Stdio.TERMINAL: an interactive terminal
    start: StartMode = StartMode.AUTO  # boot, or restore from a template (runtime/warm.py)
    # What the guest is told of the user (privacy.py): both resolved ("host" -> the host's) at build().
    timezone: str = ""
    language: str = ""
    quiet: bool = True                 # the quiet-browser settings (docs/quiet.md); False: a baseline
    allow: tuple[str, ...] = ()        # quiet settings the profile turned back on ("safe-browsing")
    log_requests: bool = False         # record every connection and DNS query of the guest (net/capture.py)
    features: Features = field(default_factory=Features)  # what may cross: clipboard, files, sound (features.py)
    keep: str = ""                     # the volume that keeps the app's profile (storage/volumes.py); "" = none
    automation: str = ""               # the protocol of the app's debugging endpoint (profiles.AUTOMATION); "" = off
    record: bool = False               # record the web display to a video kept in the workspace (runtime/record.py)

    @property
    def kind(self) -> VmmKind:
        return VmmKind(self.backend) if self.backend != "auto" else VmmKind.QEMU

    def cmdline(self) -> tuple[str, ...]:
        """Kernel arguments this request adds for the guest's init (and browser-setup.sh)."""
        args = [f"dispo.shm={self.shm_mib}"] if self.shm_mib else []  # 0: the guest's own (settings.py)
        if self.timezone:
            args.append(f"dispo.tz={self.timezone}")
        if self.language:
            args.append(f"dispo.lang={self.language}")
        if not self.quiet:
            args.append("dispo.quiet=0")
        if self.allow:
            args.append(f"dispo.allow={','.join(self.allow)}")
        args += self.features.cmdline()
        if self.keep:
            args.append(f"dispo.keep={self.features.keep_path}")
        return tuple(args)

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile or None, "image": self.image, "command": list(self.command),
                "url": self.url or None, "display": self.display.value, "name": self.name or None,
                "backend": self.backend, "memory_mib": self.memory_mib, "vcpus": self.vcpus,
                "ready_timeout_s": self.ready_timeout_s, "idle_timeout_s": self.idle_timeout_s,
                "max_lifetime_s": self.max_lifetime_s, "start": self.start.value, "timezone": self.timezone,
                "language": self.language, "quiet": self.quiet, "allow": list(self.allow),
                "log_requests": self.log_requests, "features": self.features.to_json(), "keep": self.keep or None,
                "automation": self.automation or None, "record": self.record}


def _number(key: str, value: Any, where: str) -> int | float:
    s = SETTINGS[key]
    integer = s.integer
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 512.0 is 512 (as JSON Schema's "integer" says)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not accepts(key, value):
        what = "an integer" if integer else "a number of seconds"
        extra = " (this host's memory)" if key == "memory_mib" and limit_hi(key) < s.hi else ""
        problem = "is out of range" if ok_type and not isinstance(value, bool) else f"is not {what}"
        raise InvalidInput(f"{where}{key} {show(value)} {problem}: give {what} from {limits_text(key)}{extra}",
                           hint=s.help)
    return int(value) if integer else float(value)


def check_url(url: str) -> str:
    if len(url) > MAX_URL or not _URL_RE.match(url) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput(f"invalid URL {url[:80]!r}",
                           hint="give an http:// or https:// URL (or about:blank), without spaces")
    return url


def find_image(cfg: Config, name: str) -> Image:
    try:
        return ImageStore(cfg).get(name)
    except NotFound as e:
        if name in RECIPES:  # the usual first run: say how to make it
            raise NotFound(e.message, hint=f"build it with 'dispo image build {name}' (a few minutes, once)") from None
        raise


def build(cfg: Config, *, profile: str | None = None, image: str | None = None, command: Sequence[str] = (),
          url: str | None = None, display: str | None = None, name: str | None = None, backend: str | None = None,
          stdio: Stdio = Stdio.CAPTURE, tty: bool = False, where: str = "", start: str | None = None,
          log_requests: bool = False, keep: str | None = None, automation: bool = False, record: bool = False,
          **numbers: Any) -> SessionRequest:
    """Defaults, then the profile, then the caller's values; every check before anything is created.

    `numbers` are the numeric settings (memory_mib, vcpus, shm_mib, *_timeout_s, max_lifetime_s); None
    means "not given". `where` prefixes messages (e.g. "POST /v1/sessions: ")."""
    unknown = set(numbers) - set(INT_SETTINGS) - set(SECONDS_SETTINGS)
    if unknown:
        raise InvalidInput(f"{where}unknown setting(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in numbers.items() if v is not None}
    values: dict[str, Any] = {k: SETTINGS[k].default for k in (*INT_SETTINGS, *SECONDS_SETTINGS)}
    fields: dict[str, Any] = {}
    privacy = Privacy()
    if profile:
        p = profiles.find(profile, cfg.profiles_dir)
        privacy = p.privacy
        fields["features"] = p.features
        if command:
            raise InvalidInput(f"{where}a profile runs its own command; give a URL, or an image and a command",
                               hint=f"the command of {profile!r} is set in {p.source}")
        if not p.command:
            raise InvalidInput(f"profile {profile!r} has no command", hint=f"add command = [...] to {p.source}")
        values.update(memory_mib=p.memory_mib, vcpus=p.vcpus, shm_mib=p.shm_mib, ready_timeout_s=p.ready_timeout_s,
                      idle_timeout_s=p.idle_timeout_s, max_lifetime_s=p.max_lifetime_s)
        target = check_url(url) if url else ""
        if automation and not p.automation:
            raise Conflict(f"{where}profile {profile!r} names no automation protocol",
                           hint=f'add automation = "cdp" (Chromium) or "bidi" (Firefox) to {p.source}')
        extra = AUTOMATION_OPTIONS[p.automation] if automation else ()
        fields.update(profile=p.name, image=p.image, command=p.argv(target or None, extra), url=target,
                      automation=p.automation if automation else "",
                      display=p.display, backend=p.backend, policy=p.network)
    else:
        if url:
            raise InvalidInput(f"{where}a URL goes with a profile", hint="dispo run chromium URL")
        if automation:
            raise InvalidInput(f"{where}automation drives a browser: it goes with a profile",
                               hint="dispo run chromium --automation")
        if display not in (None, DisplayMode.NONE.value):
            raise InvalidInput(f"{where}a display goes with a profile", hint="dispo run chromium --display web")
        fields.update(image=str(SETTINGS["image"].default), command=tuple(command))
    if image:
        fields["image"] = check_name(image, what="image name")
    for key, value in given.items():
        values[key] = _number(key, value, where)
    if display is not None:
        try:
            fields["display"] = DisplayMode(display)
        except ValueError:
            raise InvalidInput(f"{where}unknown display {display!r}", hint="use web, x11 or none") from None
    if automation and fields.get("display") is not DisplayMode.WEB:
        raise InvalidInput(f"{where}automation needs the app on its web display (the browser runs there)",
                           hint="drop the display option, or give display web")
    if record and fields.get("display") is not DisplayMode.WEB:
        raise InvalidInput(f"{where}a recording is of the app's web display, and this session has none",
                           hint="record a profile's session on its web display (dispo run chromium --record)")
    if fields.get("display") is DisplayMode.X11 and not os.environ.get("DISPLAY"):
        raise InvalidInput("--display x11 needs an X display, and $DISPLAY is not set",
                           hint="run from an X session (or ssh -X), or use --display web")
    if name:
        fields["name"] = check_name(name, what="session name")
    if keep:
        fields["keep"] = check_name(keep, what="volume name")
        features = fields.get("features")
        if features is None or not features.keep_path:
            what = f"profile {profile!r}" if profile else "a command"
            # Without a profile the request is wrong (400); with one, the profile's content is in the way (409).
            error = Conflict if profile else InvalidInput
            raise error(f"{where}--keep keeps an app's profile, and {what} names nothing to keep",
                        hint='use a browser profile (dispo run chromium --keep NAME), or add keep_path = '
                             '"DIR" to the profile')
    if backend:
        fields["backend"] = backend
    cmd = tuple(fields.get("command", ()))
    if any(not isinstance(c, str) or "\0" in c for c in cmd) or sum(len(c) + 1 for c in cmd) > MAX_COMMAND_BYTES:
        raise InvalidInput(f"{where}the command must be a list of strings without NUL, {MAX_COMMAND_BYTES} bytes "
                           f"at most")
    if not cmd and (stdio is not Stdio.TERMINAL or not tty):
        raise InvalidInput(f"{where}no command given and there is no terminal for a shell",
                           hint="give a command (dispo run -- CMD [ARG ...]) or a profile")
    if start is not None:
        try:
            fields["start"] = StartMode(start)
        except ValueError:
            raise InvalidInput(f"{where}unknown start {start!r}", hint="use auto, cold or warm") from None
    img = find_image(cfg, fields["image"])
    fields["backend"] = choose_backend(fields.get("backend"), img).value
    fields["timezone"], fields["language"] = resolve(privacy)
    return SessionRequest(**fields, **values, stdio=stdio, tty=tty, quiet=privacy.quiet, allow=privacy.allowed(),
                          log_requests=bool(log_requests), record=bool(record))


API_WHERE = "POST /v1/sessions: "  # what the API's messages about a request body start with


def from_json(cfg: Config, body: Mapping[str, Any], *, where: str = API_WHERE) -> SessionRequest:
    """A request from an API body: {"profile": "chromium", "url": ...} or {"image": ..., "command": [...]}."""
    if not isinstance(body, Mapping):
        raise InvalidInput(f"{where}the body must be a JSON object")
    unknown = sorted(set(body) - set(API_KEYS))
    if unknown:
        raise InvalidInput(f"{where}unknown key(s): {', '.join(unknown)}", hint=f"known keys: {', '.join(API_KEYS)}")
    # A key that is given has a value of its type (null is not "not given": the OpenAPI schema says so too).
    strings = {k: body.get(k) for k in ("profile", "image", "url", "display", "name", "backend", "start", "keep")}
    for k, v in strings.items():
        if k in body and (not isinstance(v, str) or not v):
            raise InvalidInput(f"{where}{k} must be a string (not empty)")
    command = body.get("command", [])
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command) \
            or ("command" in body and not command):
        raise InvalidInput(f"{where}command must be a list of strings (an argv, no shell), not empty",
                           hint='e.g. "command": ["sh", "-c", "echo hi"]')
    if strings["display"] == DisplayMode.X11.value:
        raise InvalidInput(f"{where}the service shows apps in its web viewer; x11 needs 'dispo run' in-process",
                           hint="use display web or none")
    flags = {k: body.get(k, False) for k in ("log_requests", "automation", "record")}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise InvalidInput(f"{where}{k} must be true or false")
    numbers: dict[str, Any] = {k: body.get(k) for k in (*INT_SETTINGS, *SECONDS_SETTINGS)}
    for k, v in numbers.items():
        if k in body and v is None:
            raise InvalidInput(f"{where}{k} must be a number", hint=SETTINGS[k].help)
    return build(cfg, command=command, where=where, stdio=Stdio.CAPTURE, profile=strings["profile"],
                 image=strings["image"], url=strings["url"], display=strings["display"], name=strings["name"],
                 backend=strings["backend"], start=strings["start"], keep=strings["keep"],
                 **flags, **numbers)
