"""The exception tree. The library raises these; only the CLI turns them into exit codes.

DispoError                      every error dispo means to report (one line + a hint)
├── ConfigError                 a bad config file, key or value
├── InvalidInput                a bad name, size, path or argument given by the user
├── NotFound                    an image, session or file that does not exist
├── PermissionProblem           not root, read-only path, no access to a device
├── CommandError                a subprocess failed (carries argv, rc, stderr)
├── StorageError                disks and images (a backend could not do its work)
├── JournalError                the session state directory is unusable
├── TeardownError               one or more undo steps failed (carries every error)
├── VmmError                    a VMM could not start, boot or stop a guest
└── NetworkError                taps, addresses, nftables
"""

from __future__ import annotations

from collections.abc import Sequence


class DispoError(Exception):
    """Base of every error dispo reports. `hint` says how to fix it."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class ConfigError(DispoError):
    hint = "fix the file or run without --config to use the defaults"


class InvalidInput(DispoError):
    pass


class NotFound(DispoError):
    pass


class PermissionProblem(DispoError):
    hint = "run dispo as root (sudo), or point it at a writable place"


class CommandError(DispoError):
    """A subprocess exited non-zero, or could not be started."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, *, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        detail = f": {last}" if last else ""
        super().__init__(f"{argv[0]} failed with exit code {returncode}{detail}", hint=hint)


class StorageError(DispoError):
    pass


class JournalError(DispoError):
    pass


class TeardownError(DispoError):
    """Some undo steps failed; the session's journal is kept so `dispo gc` can retry."""

    hint = "run 'dispo gc' to retry; 'dispo ls --all' shows what is left"

    def __init__(self, session_id: str, errors: Sequence[tuple[str, BaseException]]) -> None:
        self.session_id = session_id
        self.errors = list(errors)
        parts = "; ".join(f"{what}: {err}" for what, err in self.errors)
        super().__init__(f"teardown of session {session_id} left {len(self.errors)} step(s) undone: {parts}")


class VmmError(DispoError):
    """A VMM could not start, boot or stop a guest. The message carries the console tail when known."""


class NetworkError(DispoError):
    pass
