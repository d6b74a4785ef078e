"""Root-only files of dispod and the cluster (the access token, the dashboard's link, the cluster secret):
written fresh, and read back only when they can be trusted."""

from __future__ import annotations

import contextlib
import os
import re
import stat


def write_private(path: os.PathLike[str], text: str) -> None:
    """A root-only file, created fresh (a stale one, or anything planted in its place, is removed first)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


_TOKEN = re.compile(r"[A-Za-z0-9_-]{43,128}")  # what secrets.token_urlsafe(32) makes (43 characters)


def _distrust(st: os.stat_result) -> str:
    """Why a token file with this stat cannot be trusted ("" when it can)."""
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not {os.geteuid()}"
    if stat.S_IMODE(st.st_mode) != 0o600:
        return f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0600"
    return ""


def kept_token(path: os.PathLike[str]) -> tuple[str | None, str]:
    """The token a previous dispod kept in `path`, if that file can be trusted: a regular file (not a symlink:
    O_NOFOLLOW), owned by this user, mode 0600, holding one token. Else (None, why), "" when there is no file."""
    try:  # O_NONBLOCK: a FIFO planted there does not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, ""
    except OSError as e:  # ELOOP: a symlink
        return None, f"cannot open it safely ({e.strerror})"
    try:
        why = _distrust(os.fstat(fd))
        text = "" if why else os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not why and not _TOKEN.fullmatch(text):
        why = "it does not hold a token"
    return (None, why) if why else (text, "")
