"""The exception tree. The library raises these; only the CLI (an exit code) and the service's HTTP layer
(a problem+json answer with `http_status`) turn them into something a person sees.

DispoError            500  every error dispo means to report (one line + a hint)
├── ConfigError       500  a bad config file, key or value
├── InvalidInput      400  a bad name, size, path or argument given by the user
├── NotFound          404  an image, profile, session or file that does not exist
├── PermissionProblem 403  not root, read-only path, no access to a device
├── CommandError      500  a subprocess failed (carries argv, rc, stderr)
├── SpawnFailed       500  a child exited before it could be journaled (processes.py)
├── FetchError        500  a download failed or did not match its checksum (fetch.py)
├── InstallError      500  a Firecracker release could not be installed (vmm/firecracker/install.py)
├── StorageError      500  disks and images (a backend could not do its work)
├── JournalError      500  the session state directory is unusable
├── TeardownError     500  one or more undo steps failed (carries every error)
├── NotClean          500  the disposal receipt found objects of a session still there (receipt.py)
├── VmmError          502  a VMM could not start, boot or stop a guest
│   ├── GuestFailure  502  the VMM or guest failed; carries the console tail (vmm/base.py)
│   ├── DisplayError  502  the app or its display did not come up (runtime/app.py)
│   ├── ApiError      502  Firecracker answered an API call with a fault (vmm/firecracker/api.py)
│   ├── Unsupported   502  the VMM backend cannot do this (its `capabilities`, vmm/base.py)
│   ├── AgentError    502  the in-guest identity agent did not answer or refused (guest/agent.py)
│   └── ApiUnreachable 502 Firecracker's API socket did not answer (vmm/firecracker/api.py)
├── NetworkError      500  taps, addresses, nftables
├── Busy              429  a limit is reached (max_sessions): try again later
├── Conflict          409  the session is not in a state that allows this (e.g. not running yet)
├── Cancelled         499  a session was stopped while it was still starting (carries the reason)
├── Refused           403  the session's profile does not allow this (clipboard, downloads, uploads, sound)
├── TooLarge          413  bigger than the profile's cap (an upload, a download, clipboard text)
├── GuestIOError      502  the guest did not do what dispo-files was asked (runtime/guestio.py)
│   └── GuestOverflow 502  the guest answered more than dispo reads (a listing, the clipboard, an error)
└── ServiceError      503  dispod could not be reached or answered something that is not dispo's
"""

from __future__ import annotations

from collections.abc import Sequence


class DispoError(Exception):
    """Base of every error dispo reports. `hint` says how to fix it."""

    hint: str = ""
    http_status: int = 500

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
    http_status = 400


class NotFound(DispoError):
    http_status = 404


class PermissionProblem(DispoError):
    http_status = 403
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

    http_status = 502


class NetworkError(DispoError):
    pass


class Busy(DispoError):
    """A limit is reached (e.g. max_sessions)."""

    http_status = 429
    hint = "wait for a session to end, or raise max_sessions in the config"


class Conflict(DispoError):
    """The session is not in a state that allows this."""

    http_status = 409


class Cancelled(DispoError):
    """A session was stopped while it was starting; `reason` says by whom."""

    http_status = 499

    def __init__(self, reason: str) -> None:
        super().__init__(f"stopped while starting: {reason}")
        self.reason = reason


class Refused(DispoError):
    """The session's profile does not allow this (a clipboard direction, downloads, uploads, sound)."""

    http_status = 403


class TooLarge(DispoError):
    """Bigger than the profile's cap."""

    http_status = 413


class GuestIOError(DispoError):
    """The guest did not do what it was asked (list, fetch or receive a file; the clipboard; sound)."""

    http_status = 502


class GuestOverflow(GuestIOError):
    """The guest answered more than dispo reads of that answer: the command was stopped at the cap. The
    guest's fault (502), not the caller's (413)."""

    hint = ("the guest printed too much: its dispo-files or the user's shell startup files misbehave (end the "
            "session), or the guest's clipboard holds more than the profile's [clipboard] max_bytes")


class ServiceError(DispoError):
    """dispod could not be reached, or answered with something that is not dispo's."""

    http_status = 503
    hint = "check that dispod runs ('systemctl status dispod'), or remove its socket to run in-process"


ALL_ERRORS: tuple[type[DispoError], ...] = (
    DispoError, ConfigError, InvalidInput, NotFound, PermissionProblem, CommandError, StorageError, JournalError,
    TeardownError, VmmError, NetworkError, Busy, Conflict, Cancelled, Refused, TooLarge, GuestIOError, GuestOverflow,
    ServiceError,
)


def from_problem(problem: dict[str, object]) -> DispoError:
    """The error a problem dict (an API answer or an ended event) describes, as the same class if known."""
    name = str(problem.get("type") or problem.get("title") or "DispoError").rsplit("/", 1)[-1]
    message = str(problem.get("message") or problem.get("detail") or name)
    hint = str(problem.get("hint") or "")
    for cls in ALL_ERRORS:
        if cls.__name__ == name and cls not in (TeardownError, CommandError, Cancelled):
            return cls(message, hint=hint)
    err = DispoError(message, hint=hint)
    return err
