"""`--open`: the viewer opened in the desktop's browser without its token on any command line.

The viewer's URL carries the session's token. Handed to a browser as an argument, it would be in the argv of
xdg-open and of the browser, readable by every local user in /proc; and under sudo the browser would run as
root. So, as Jupyter does, dispo writes a small HTML file that redirects to the URL: mode 0600, owned by the
user who invoked dispo ($SUDO_UID/$SUDO_GID under sudo), in a directory of its own (0700, that user's), and
starts the opener ($BROWSER, else xdg-open) as that user with the file's path. The directory is journaled
(kind `path`) before it is made and removed when the session ends; after a crash `dispo gc` removes it.
"""

from __future__ import annotations

import contextlib
import html
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from dispo.config import Config
from dispo.infra.processes import SETPRIV
from dispo.infra.txn import Transaction, transaction

LOOP_ENV = "DISPO_OPENING"  # set for the opener: a `dispo open` it starts (dispo as http handler) is a loop
FILE_NAME = "open-viewer.html"
DIR_PREFIX = "dispo-viewer-"


@dataclass(frozen=True)
class User:
    uid: int
    gid: int


def invoking_user() -> User:
    """Who asked for this: the sudo caller when root runs under sudo, else this process's user."""
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError, ValueError):
            uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
            if uid >= 0 and gid >= 0:
                return User(uid, gid)
    return User(os.getuid(), os.getgid())


def redirect_page(url: str) -> str:
    target = html.escape(url, quote=True)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">\n'
            f'<meta http-equiv="refresh" content="0;url={target}">\n<title>dispo viewer</title></head>\n'
            f'<body><p><a href="{target}">Open the dispo viewer</a></p></body></html>\n')


def opener_argv(path: Path, env: dict[str, str]) -> list[str] | None:
    """$BROWSER's first command (with %s, or the path appended), else xdg-open; None when neither exists."""
    for entry in (env.get("BROWSER") or "").split(os.pathsep):
        words = shlex.split(entry) if entry.strip() else []
        if words and shutil.which(words[0], path=env.get("PATH")):
            if any("%s" in w for w in words):
                return [w.replace("%s", str(path)) for w in words]
            return [*words, str(path)]
    found = shutil.which("xdg-open", path=env.get("PATH"))
    return [found, str(path)] if found else None


class ViewerLink:
    """The redirect file of one `dispo run --open`, alive until `close()` (the end of the session)."""

    def __init__(self, cfg: Config, user: User | None = None) -> None:
        self.cfg = cfg
        self.user = user or invoking_user()
        self.path: Path | None = None
        self._stack = contextlib.ExitStack()
        self._tx: Transaction | None = None

    def __enter__(self) -> ViewerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()  # the transaction's unwind removes the directory
        self.path = None

    def write(self, url: str) -> Path:
        if self._tx is None:
            self._tx = self._stack.enter_context(transaction(self.cfg, purpose="viewer link"))
        directory = Path(tempfile.gettempdir()) / f"{DIR_PREFIX}{self._tx.session_id}"
        self._tx.journal.record("path", path=str(directory))
        os.mkdir(directory, 0o700)  # fails on anything already there (a link planted in /tmp included)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fd = os.open(FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o600)  # whatever the umask
                if os.geteuid() == 0:
                    os.fchown(fd, self.user.uid, self.user.gid)
                f.write(redirect_page(url))
            if os.geteuid() == 0:
                os.fchown(dir_fd, self.user.uid, self.user.gid)
        finally:
            os.close(dir_fd)
        self.path = directory / FILE_NAME
        return self.path

    def open(self, url: str) -> bool:
        """Write the file and start the opener on it as the invoking user; False when there is no opener."""
        env = self._env()
        path = self.path or self.write(url)
        argv = opener_argv(path, env)
        if argv is None:
            return False
        if os.geteuid() == 0 and self.user.uid != 0:
            argv = [SETPRIV, f"--reuid={self.user.uid}", f"--regid={self.user.gid}", *self._groups(),
                    "--inh-caps=-all", "--", *argv]
        # Not processes.spawn_recorded: the opener hands the page to the user's browser, which is the user's
        # and outlives the session (and dispo), so it must not die with this process nor be undone.
        try:
            child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            return False
        # The browser is the user's and outlives the session; only reap the opener when it returns.
        threading.Thread(target=child.wait, name="viewer-opener", daemon=True).start()
        return True

    def _groups(self) -> list[str]:
        try:
            pwd.getpwuid(self.user.uid)
        except KeyError:
            return ["--clear-groups"]
        return ["--init-groups"]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
        env[LOOP_ENV] = "1"
        if os.geteuid() == 0 and self.user.uid != 0:
            with contextlib.suppress(KeyError):
                entry = pwd.getpwuid(self.user.uid)
                env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
        return env
