"""The host's apt configuration, turned into the Debian sources an image build uses.

dispo never names a mirror itself: it reads /etc/apt/sources.list and /etc/apt/sources.list.d/ (one-line
`*.list` and deb822 `*.sources` files, as apt does; other names such as `*.disabled` are ignored, as apt
ignores them) and keeps the `deb` entries for the suite being built and its -updates/-security companions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dispo.errors import InvalidInput, NotFound

SOURCES_HINT = "configure a Debian mirror for this suite in /etc/apt/sources.list or /etc/apt/sources.list.d/"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""

    def deb822(self) -> str:
        lines = ["Types: deb", f"URIs: {self.uri}", f"Suites: {' '.join(self.suites)}",
                 f"Components: {' '.join(self.components)}"]
        if self.signed_by:
            lines.append(f"Signed-By: {self.signed_by}")
        return "\n".join(lines) + "\n"


def _fields(stanza: str) -> dict[str, str]:
    out: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and key:  # continuation line
            out[key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        out[key] = value.strip()
    return out


def parse_deb822(text: str) -> list[AptSource]:
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        f = _fields(stanza)
        if "deb" not in f.get("types", "").split() or f.get("enabled", "yes").lower() == "no":
            continue
        for uri in f.get("uris", "").split():
            found.append(AptSource(uri, tuple(f.get("suites", "").split()), tuple(f.get("components", "").split()),
                                   f.get("signed-by", "")))
    return found


def parse_one_line(text: str) -> list[AptSource]:
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb ") and not line.startswith("deb\t"):
            continue
        rest = line[3:].strip()
        opts: dict[str, str] = {}
        if rest.startswith("["):
            inner, _, rest = rest[1:].partition("]")
            for opt in inner.split():
                k, _, v = opt.partition("=")
                opts[k] = v
        words = rest.split()
        if len(words) < 2:
            continue
        found.append(AptSource(words[0], (words[1],), tuple(words[2:]), opts.get("signed-by", "")))
    return found


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled `deb` source of the host, in apt's reading order."""
    found: list[AptSource] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        found += parse_one_line(main.read_text())
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.suffix == ".list":
                found += parse_one_line(f.read_text())
            elif f.suffix == ".sources":
                found += parse_deb822(f.read_text())
    return found


def for_suite(suite: str, etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """The host's sources for `suite` (and suite-updates, suite-security), restricted to those suites."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    out = []
    for src in host_sources(etc_apt):
        suites = tuple(s for s in src.suites if s in wanted)
        if suites and "main" in src.components:
            out.append(AptSource(src.uri, suites, ("main",), src.signed_by))
    if not any(suite in s.suites for s in out):
        if not etc_apt.exists():
            raise NotFound(f"no apt configuration at {etc_apt}", hint=SOURCES_HINT)
        raise InvalidInput(f"the host's apt configuration has no '{suite}' source with component 'main'",
                           hint=SOURCES_HINT)
    return out


def deb822_text(sources: list[AptSource]) -> str:
    return "\n".join(s.deb822() for s in sources)
