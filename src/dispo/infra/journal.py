"""The session journal: a state directory per session recording every host object before it exists.

Layout: <state_dir>/sessions/<id>/state.json plus a `lock` file. The owner holds an exclusive flock on
`lock` for the session's whole life; the kernel drops it when the owner dies, however it dies, so
"can I take the lock?" is the liveness test for `dispo ls` and `dispo gc` (no pid reuse races). The pid in
state.json is for people.

Unwinding runs the undo actions in reverse order of recording, keeps going past a failing step, and removes
the state directory only when every step succeeded; otherwise the journal stays for `dispo gc`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispo.errors import DispoError, JournalError, PermissionProblem, TeardownError
from dispo.infra import undo
from dispo.names import check_session_id

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "lock"
# A directory being born (".new-<id>") is only swept by gc when older than this.
_NASCENT_GRACE_S = 60.0
_TEARDOWN_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@dataclass
class Entry:
    seq: int
    kind: str
    args: dict[str, str]

    def describe(self) -> str:
        return f"{self.kind} {' '.join(f'{k}={v}' for k, v in sorted(self.args.items()))}"


@dataclass
class Journal:
    session_id: str
    path: Path
    meta: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    # Every entry this process recorded and did not hand over (forget): what the disposal receipt checks.
    recorded: list[Entry] = field(default_factory=list)
    _lock_fd: int | None = None
    _next_seq: int = 1
    # A running session's guest commands (runtime/guestio.py) record and drop their processes from other
    # threads than the session's, also while it unwinds: the entries and the file change under this lock,
    # and nothing new is recorded once the unwind has taken its list.
    _mutex: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    _closing: bool = False

    # -- creation and discovery -------------------------------------------------------------------
    @classmethod
    def create(cls, state_dir: Path, session_id: str, meta: Mapping[str, Any]) -> Journal:
        """Create and lock a new journal. The directory appears under its final name already locked."""
        check_session_id(session_id)
        root = sessions_root(state_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            nascent = root / f".new-{session_id}"
            nascent.mkdir(mode=0o700)
        except FileExistsError:
            raise JournalError(f"session {session_id} already exists in {root}") from None
        except PermissionError as e:
            raise PermissionProblem(f"cannot create session state under {root}: {e.strerror}") from None
        except OSError as e:
            raise JournalError(f"cannot create session state under {root}: {e.strerror}",
                               hint="set state_dir in the config or DISPO_STATE_DIR to a writable place") from None
        fd = os.open(nascent / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        final = root / session_id
        journal = cls(session_id, final, dict(meta), _lock_fd=fd)
        journal.meta.setdefault("created", time.time())
        journal.meta["owner_pid"] = os.getpid()
        journal._write(nascent)
        os.rename(nascent, final)
        log.debug("journal %s created at %s", session_id, final)
        return journal

    @classmethod
    def load(cls, path: Path) -> Journal:
        try:
            data = json.loads((path / STATE_FILE).read_text())
            entries = [Entry(int(e["seq"]), str(e["kind"]), {str(k): str(v) for k, v in e["args"].items()})
                       for e in data.get("resources", [])]
            j = cls(check_session_id(str(data["id"])), path, dict(data.get("meta", {})), entries)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, DispoError) as e:
            # Anything a truncated, hand-edited or hostile file can be: one error type for the callers.
            raise JournalError(f"unreadable session state {path / STATE_FILE}: {e}") from None
        j._next_seq = max((e.seq for e in entries), default=0) + 1
        return j

    def try_lock(self) -> bool:
        """Take the lock if the owner is gone. True if this process now owns the journal."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._lock_fd = fd
        return True

    # -- recording --------------------------------------------------------------------------------
    def record(self, kind: str, **args: str) -> Entry:
        """Write down (kind, args) *before* the caller creates the object. Raises if the kind has no undo."""
        undo.lookup(kind)
        with self._mutex:
            self._require_lock()
            if self._closing:
                raise JournalError(f"session {self.session_id} is ending: nothing new is made for it")
            entry = Entry(self._next_seq, kind, {k: str(v) for k, v in args.items()})
            self._next_seq += 1
            self.entries.append(entry)
            self.recorded.append(entry)
            self._write()
        return entry

    def record_all(self, items: Sequence[tuple[str, Mapping[str, str]]]) -> list[Entry]:
        """record() for several objects about to be made, with one write (and one fsync) for them all."""
        for kind, _ in items:
            undo.lookup(kind)
        with self._mutex:
            self._require_lock()
            if self._closing:
                raise JournalError(f"session {self.session_id} is ending: nothing new is made for it")
            made = []
            for kind, args in items:
                entry = Entry(self._next_seq, kind, {k: str(v) for k, v in args.items()})
                self._next_seq += 1
                made.append(entry)
            self.entries += made
            self.recorded += made
            self._write()
        return made

    def set_meta(self, **values: Any) -> None:
        """Add to what the journal says about its session (e.g. the image's proof, for a reclaim's receipt)."""
        with self._mutex:
            self._require_lock()
            self.meta.update(values)
            self._write()

    def forget(self, entry: Entry) -> None:
        """The object now belongs to someone else (a committed image): stop tracking it."""
        with self._mutex:
            self._require_lock()
            self.entries = [e for e in self.entries if e.seq != entry.seq]
            self.recorded = [e for e in self.recorded if e.seq != entry.seq]
            self._write()

    def gone(self, entry: Entry) -> None:
        """The object no longer exists and its owner saw it end (a child it reaped): stop tracking it, also
        for the receipt, so a session's many short guest commands do not pile up in it. Quietly nothing
        once the session's unwind has the journal (it undoes the entry, idempotently)."""
        with self._mutex:
            if self._lock_fd is None or self._closing:
                return
            self.forget(entry)

    def undo_entry(self, entry: Entry) -> None:
        """Undo one object now (before the session ends) and drop it from the journal."""
        undo.lookup(entry.kind)(entry.args)
        with self._mutex:
            self._require_lock()
            self.entries = [e for e in self.entries if e.seq != entry.seq]  # still in `recorded`: it must be gone
            self._write()

    # -- teardown ---------------------------------------------------------------------------------
    def unwind(self) -> None:
        """Undo everything in reverse order, collecting errors; remove the journal if all went well."""
        self._require_lock()
        # A second Ctrl-C or SIGTERM must not cut teardown short: hold them until it is done.
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _TEARDOWN_SIGNALS)
        try:
            self._unwind()
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _unwind(self) -> None:
        errors: list[tuple[str, BaseException]] = []
        with self._mutex:
            self._closing = True
            todo = list(self.entries)
        for entry in reversed(todo):
            try:
                undo.lookup(entry.kind)(entry.args)
            except Exception as e:  # keep going, report all
                log.warning("undo %s failed: %s", entry.describe(), e)
                errors.append((entry.describe(), e))
                continue
            with self._mutex:
                self.entries = [e for e in self.entries if e.seq != entry.seq]
        # One write at the end, not one per entry: every undo is idempotent, so a crash meanwhile only means
        # a `dispo gc` redoes some of them; an fsync per entry cost milliseconds of every teardown.
        if errors:
            try:
                with self._mutex:
                    self._write()
            except OSError as e:
                # A full disk or no file descriptors left: the journal still lists everything, gc redoes it.
                log.warning("session %s: journal not updated after its unwind: %s", self.session_id, e)
        if errors:
            self.release()
            raise TeardownError(self.session_id, errors)
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- internals --------------------------------------------------------------------------------
    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise JournalError(f"session {self.session_id}: journal is not locked by this process")

    def _write(self, directory: Path | None = None) -> None:
        directory = directory or self.path
        data = {
            "id": self.session_id,
            "meta": self.meta,
            "resources": [{"seq": e.seq, "kind": e.kind, "args": e.args} for e in self.entries],
        }
        tmp = directory / f".{STATE_FILE}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / STATE_FILE)


def sessions_root(state_dir: Path) -> Path:
    return state_dir / "sessions"


@dataclass(frozen=True)
class JournalInfo:
    session_id: str
    path: Path
    alive: bool
    meta: Mapping[str, Any]
    resources: tuple[Entry, ...]


def scan(state_dir: Path) -> Iterator[JournalInfo]:
    """Every journal under state_dir, with whether its owner still holds it."""
    root = sessions_root(state_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            j = Journal.load(path)
        except JournalError as e:
            if path.exists():  # else it ended while we looked
                log.warning("%s", e)
            continue
        alive = not j.try_lock()
        j.release()
        yield JournalInfo(j.session_id, path, alive, j.meta, tuple(j.entries))


@dataclass(frozen=True)
class Reclaimed:
    """A dead owner's journal gc unwound: what the disposal receipt of a reclaimed session is made from."""

    session_id: str
    path: Path
    meta: Mapping[str, Any]
    entries: tuple[Entry, ...]
    teardown_s: float


@dataclass
class GcReport:
    reclaimed: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    failed: list[DispoError] = field(default_factory=list)
    sessions: list[Reclaimed] = field(default_factory=list)  # one per id in `reclaimed`


def gc(state_dir: Path) -> GcReport:
    """Unwind the journals whose owner is dead. Safe to run at any time, and twice."""
    report = GcReport()
    root = sessions_root(state_dir)
    if not root.is_dir():
        return report
    for path in sorted(root.iterdir()):
        if path.name.startswith(".new-"):
            _sweep_nascent(path)
            continue
        if path.name.startswith(".") or not (path / STATE_FILE).exists():
            continue
        try:
            j = Journal.load(path)
        except JournalError as e:
            # One bad journal must not stop gc for the others: report it and go on.
            report.failed.append(JournalError(f"session state {path} is unreadable ({e}); nothing undone for it",
                                              hint=f"look at {path / STATE_FILE}; remove the directory once its "
                                                   f"objects are gone"))
            continue
        if not j.try_lock():
            continue
        described = [e.describe() for e in j.entries]
        entries, t0 = tuple(j.entries), time.monotonic()
        try:
            j.unwind()
        except TeardownError as e:
            report.failed.append(e)
        else:
            report.reclaimed.append(j.session_id)
            report.undone.extend(described)
            report.sessions.append(Reclaimed(j.session_id, path, j.meta, entries, time.monotonic() - t0))
    return report


def _sweep_nascent(path: Path) -> None:
    # A crash between mkdir and rename: it never recorded a resource, so it only needs deleting.
    with contextlib.suppress(FileNotFoundError):
        if time.time() - path.stat().st_mtime > _NASCENT_GRACE_S:
            j = Journal(path.name.removeprefix(".new-"), path, {})
            if not (path / LOCK_FILE).exists() or j.try_lock():
                shutil.rmtree(path, ignore_errors=True)
                j.release()
