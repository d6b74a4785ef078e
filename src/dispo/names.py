"""Validation of every name and size a user hands to dispo, before anything is created."""

from __future__ import annotations

import re
import secrets

from dispo.errors import InvalidInput

# Names become file names, subvolume names and parts of device names: keep them boring.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SESSION_ID_RE = re.compile(r"^[0-9a-f]{8}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

SESSION_ID_LEN = 8


def check_name(name: str, *, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # fullmatch: "$" would let "x\n" through
        raise InvalidInput(
            f"invalid {what} {name!r}",
            hint="use 1-32 characters from a-z, 0-9, '-' and '_', starting with a letter or digit",
        )
    return name


def new_session_id() -> str:
    """8 hex digits: short enough for 15-character device names such as 'dsp-1a2b3c4d'."""
    return secrets.token_hex(SESSION_ID_LEN // 2)


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        raise InvalidInput(f"invalid session id {session_id!r}", hint="session ids are 8 hex digits; see 'dispo ls'")
    return session_id


def parse_size(text: str) -> int:
    """'6G', '512M', '1GiB', '4096' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidInput(f"invalid size {text!r}", hint="write a size such as 512M, 6G or 6GiB")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise InvalidInput(f"invalid size {text!r}", hint="the size must be larger than zero")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
