"""The exception tree, all of it: every error dispo raises is a class here and in `ALL_ERRORS`. The library
raises these; only the CLI (an exit code) and the service's HTTP layer (a problem+json answer with the class's
`http_status`: a class's status is set there and nowhere else) turn them into something a person sees. A problem
document names the class, and carries the class's `problem_fields` as extension members, so `from_problem`
(DispodClient, `dispo run` through dispod) rebuilds the same class with the same message, hint and fields.

DispoError            500  every error dispo means to report (one line + a hint)
├── ConfigError       500  a bad config file, key or value
├── InvalidInput      400  a bad name, size, path or argument given by the user
├── NotFound          404  an image, profile, session or file that does not exist
├── PermissionProblem 403  not root, read-only path, no access to a device
├── CommandError      500  a subprocess failed (carries argv, rc, stderr)
├── SpawnFailed       500  a child exited before it could be journaled
├── FetchError        500  a download failed or did not match its checksum
├── InstallError      500  a Firecracker release could not be installed
├── StorageError      500  disks and images (a backend could not do its work)
├── JournalError      500  the session state directory is unusable
├── TeardownError     500  one or more undo steps failed (carries every error)
├── NotClean          500  the disposal receipt found objects of a session still there
├── VmmError          502  a VMM could not start, boot or stop a guest
│   ├── GuestFailure  502  the VMM or guest failed; carries the console tail
│   ├── DisplayError  502  the app or its display did not come up
│   ├── ApiError      502  Firecracker answered an API call with a fault
│   ├── Unsupported   502  the VMM backend cannot do this (its `capabilities`)
│   ├── AgentError    502  the in-guest identity agent did not answer or refused
│   └── ApiUnreachable 502 Firecracker's API socket did not answer
├── NetworkError      500  taps, addresses, nftables
├── Busy              429  a limit is reached (max_sessions): try again later
├── Conflict          409  the session is not in a state that allows this (e.g. not running yet)
├── Cancelled         499  a session was stopped while it was still starting (carries the reason)
├── Refused           403  the session's profile does not allow this (clipboard, downloads, uploads, sound)
├── TooLarge          413  bigger than the profile's cap (an upload, a download, clipboard text)
├── GuestIOError      502  the guest did not do what dispo-files was asked
│   └── GuestOverflow 502  the guest answered more than dispo reads (a listing, the clipboard, an error)
└── ServiceError      503  dispod could not be reached or answered something that is not dispo's
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

STDERR_CAP = 4096  # characters of a CommandError's stderr a problem document carries (its last line is in the message)


class DispoError(Exception):
    """Base of every error dispo reports. `hint` says how to fix it."""

    hint: str = ""
    http_status: int = 500
    # The attributes beyond message and hint that a problem document carries (extension members), each with
    # its JSON type (str, int, or list of str), so a client rebuilds them.
    problem_fields: ClassVar[Mapping[str, type]] = {}

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

    def members(self) -> dict[str, Any]:
        """The extension members of this error's problem document: its `problem_fields`."""
        return {name: getattr(self, name) for name in self.problem_fields}

    @classmethod
    def rebuild(cls, message: str, hint: str, members: Mapping[str, object]) -> Self:
        """The error a problem document describes. The message is the one sent, not made again from the fields
        (the class's own __init__ is not run); a field missing or of the wrong type gets its type's empty value."""
        err = cls.__new__(cls)
        DispoError.__init__(err, message, hint=hint)
        for name, kind in cls.problem_fields.items():
            value = members.get(name)
            if kind is list:
                value = [str(v) for v in value] if isinstance(value, list) else []
            elif not isinstance(value, kind) or isinstance(value, bool):
                value = kind()
            setattr(err, name, value)
        return err


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

    problem_fields: ClassVar[Mapping[str, type]] = {"argv": list, "returncode": int, "stderr": str}

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, *, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        detail = f": {last}" if last else ""
        super().__init__(f"{argv[0]} failed with exit code {returncode}{detail}", hint=hint)

    def members(self) -> dict[str, Any]:
        return {**super().members(), "stderr": self.stderr[-STDERR_CAP:]}


class SpawnFailed(DispoError):
    """A child exited before it could be recorded (its program could not even be started)."""


class FetchError(DispoError):
    """A download (guest kernels and root filesystems) failed or did not match its checksum."""

    hint = "check the URL (firecracker.artifacts_url in the config) and the network; run again to resume"


class InstallError(DispoError):
    """A Firecracker release could not be downloaded, checked or installed."""

    hint = "check --url/--version (firecracker.release_url in the config) and the network"


class StorageError(DispoError):
    pass


class JournalError(DispoError):
    pass


class TeardownError(DispoError):
    """Some undo steps failed; the session's journal is kept so `dispo gc` can retry."""

    hint = "run 'dispo gc' to retry; 'dispo ls --all' shows what is left"
    problem_fields: ClassVar[Mapping[str, type]] = {"session_id": str}

    def __init__(self, session_id: str, errors: Sequence[tuple[str, BaseException]]) -> None:
        self.session_id = session_id
        self.errors = list(errors)
        parts = "; ".join(f"{what}: {err}" for what, err in self.errors)
        super().__init__(f"teardown of session {session_id} left {len(self.errors)} step(s) undone: {parts}")

    def members(self) -> dict[str, Any]:
        # Each undone step with its own error as a problem of its own (not JSON as it is: a BaseException).
        return {**super().members(), "errors": [{"step": what, **to_problem(err)} for what, err in self.errors]}

    @classmethod
    def rebuild(cls, message: str, hint: str, members: Mapping[str, object]) -> Self:
        err = super().rebuild(message, hint, members)
        steps = members.get("errors")
        err.errors = [(str(s.get("step", "")), from_problem(s)) for s in (steps if isinstance(steps, list) else [])
                      if isinstance(s, dict)]
        return err


class NotClean(DispoError):
    """The teardown ran but the receipt found objects of the session still on the host."""

    hint = "run 'dispo gc' to retry the teardown, then 'dispo verify'"
    problem_fields: ClassVar[Mapping[str, type]] = {"session_id": str, "leftovers": list}

    def __init__(self, session_id: str, leftovers: list[str]) -> None:
        self.session_id = session_id
        self.leftovers = leftovers
        super().__init__(f"session {session_id}: disposal receipt not clean, {len(leftovers)} object(s) left: "
                         + "; ".join(leftovers))


class VmmError(DispoError):
    """A VMM could not start, boot or stop a guest. The message carries the console tail when known."""

    http_status = 502


class GuestFailure(VmmError):
    """The VMM or its guest failed; carries the console tail for the CLI to show above the one-line error."""

    problem_fields: ClassVar[Mapping[str, type]] = {"console_tail": str}

    def __init__(self, message: str, *, hint: str = "", console_tail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.console_tail = console_tail


class DisplayError(VmmError):
    """The app or its display did not come up."""


class ApiError(VmmError):
    """Firecracker refused a request: `operation` is the spec's operationId, `fault` its fault_message,
    `api_status` the HTTP status of its answer."""

    hint = "the request is logged with -vv; the firecracker log in the session directory has details"
    problem_fields: ClassVar[Mapping[str, type]] = {"operation": str, "api_status": int, "fault": str}

    def __init__(self, operation: str, method: str, path: str, status: int, fault: str) -> None:
        self.operation = operation
        self.api_status = status
        self.fault = fault
        super().__init__(f"firecracker {operation} ({method} {path}) failed with HTTP {status}: {fault}")


class Unsupported(VmmError):
    """The backend cannot do this (see its `capabilities`)."""


class AgentError(VmmError):
    """The in-guest agent did not answer, or refused a request."""


class ApiUnreachable(VmmError):
    """Firecracker's API socket did not answer."""

    hint = "the firecracker process may have exited; see its log and console in the session directory"


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
    problem_fields: ClassVar[Mapping[str, type]] = {"reason": str}

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
    DispoError, ConfigError, InvalidInput, NotFound, PermissionProblem, CommandError, SpawnFailed, FetchError,
    InstallError, StorageError, JournalError, TeardownError, NotClean, VmmError, GuestFailure, DisplayError,
    ApiError, Unsupported, AgentError, ApiUnreachable, NetworkError, Busy, Conflict, Cancelled, Refused, TooLarge,
    GuestIOError, GuestOverflow, ServiceError,
)
_BY_NAME = {cls.__name__: cls for cls in ALL_ERRORS}


def to_problem(error: BaseException) -> dict[str, Any]:
    """An error as data (session status, events, a TeardownError's steps): the class name, one-line message,
    hint, HTTP status, console tail (for every class: the API has always had it) and the class's fields."""
    if isinstance(error, DispoError):
        return {"type": type(error).__name__, "message": " ".join(error.message.split()), "hint": error.hint,
                "status": error.http_status, "console_tail": "", **error.members()}
    return {"type": type(error).__name__, "message": str(error), "hint": "", "status": 500, "console_tail": ""}


def from_problem(problem: Mapping[str, object]) -> DispoError:
    """The error a problem document (an API answer, or `to_problem`'s form in a session's status and events)
    describes: the class it names (a plain DispoError if none), with its message, hint and fields."""
    name = str(problem.get("type") or problem.get("title") or "DispoError").rsplit("/", 1)[-1]
    message = str(problem.get("message") or problem.get("detail") or name)
    hint = str(problem.get("hint") or "")
    return _BY_NAME.get(name, DispoError).rebuild(message, hint, problem)
