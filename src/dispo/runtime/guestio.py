"""A running session's downloads, uploads, clipboard and sound, through its channel into the guest.

Each operation runs the guest's `dispo-files` (guest/files.sh) as the unprivileged user over the session's
SSH, after checking the request's policy (features.py) here: a direction the profile turned off is refused
before the guest is asked. The guest is hostile, so what it answers is parsed strictly: a listing is
"SIZE/NAME\\0" records (a bounded number of them), a name is used again only after `check_guest_name`, every
read is capped, and names meant for the host's file system go through `host_name`.

The CLI (`--downloads DIR`), the viewer and dispod's API all call these; none of them talks to the guest
itself. Each guest command's host process is spawned like every child of dispo's (processes.spawn_recorded):
recorded in the session's journal before it runs, killed with the thread that started it, and dropped from
the journal once it has been reaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from dispo import guest
from dispo.config import ServiceConfig
from dispo.errors import (
    Busy,
    Conflict,
    GuestIOError,
    GuestOverflow,
    InvalidInput,
    JournalError,
    NotFound,
    Refused,
    TooLarge,
)
from dispo.features import MIB, Features
from dispo.infra import processes
from dispo.infra.journal import Journal
from dispo.runtime.cancel import CancelToken

PARTIAL_SUFFIXES = (".crdownload", ".part")  # Chromium's and Firefox's files of a download under way
MAX_LISTED = 1000
MAX_NAME_BYTES = 255
COMMAND_TIMEOUT_S = 30.0
CHUNK = 1 << 16
UPLOADS_PER_SESSION = 4   # uploads under way at once; each holds a guest command (an SSH channel) and one
UPLOADS_PER_PROCESS = 16  # chunk of its body at a time, so the bytes in flight are bounded by these
ERR_CAP = 64 * 1024  # what dispo reads of a guest command's stderr (its error message)
ABORT_GRACE_S = 2.0  # a stopped command's time to clean up after its stdin ended, before it is killed
SOUND_FRAME = 4800 * 4  # what a sound stream hands on at most at once: 50 ms of s16le stereo at 48 kHz

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Download:
    name: str
    size: int
    complete: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "complete": self.complete}


def check_guest_name(name: str) -> str:
    """A file name as the guest may use it: one path component, no NUL, not . or .., at most 255 bytes."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name
            or len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES):
        raise InvalidInput(f"invalid file name {str(name)[:80]!r}",
                           hint="one file name: no '/', not '.' or '..', at most 255 bytes")
    return name


def host_name(name: str, fallback: str = "download") -> str:
    """A guest's file name made safe to create in a host directory: no path separator, no control or
    format character, no leading dot or dash, no trailing dot or space, at most 200 bytes, never empty."""
    out = []
    for ch in unicodedata.normalize("NFC", name):
        cat = unicodedata.category(ch)
        if ch in "/\\" or cat[0] == "C" or ch == "\ufffd":
            out.append("_")
        else:
            out.append(ch)
    text = "".join(out).strip().strip(". ")
    text = text.lstrip("-.")
    while len(text.encode()) > 200:
        text = text[:-1]
    return text or fallback


def parse_listing(raw: bytes) -> list[Download]:
    """`dispo-files list` output: "SIZE/NAME\\0" records. Anything malformed is skipped, not trusted."""
    found: dict[str, int] = {}
    for record in raw.split(b"\0"):
        if len(found) >= MAX_LISTED:
            break
        digits, sep, raw_name = record.partition(b"/")
        if not sep or not digits.isdigit() or len(digits) > 15 or not raw_name or b"/" in raw_name:
            continue
        name = raw_name.decode(errors="surrogateescape")
        try:
            check_guest_name(name)
        except InvalidInput:
            continue
        found[name] = int(digits)
    downloads = []
    for name, size in sorted(found.items()):
        if name.endswith(PARTIAL_SUFFIXES):
            continue  # the file of a download under way: listed as its target, incomplete
        partial = any(name + suffix in found for suffix in PARTIAL_SUFFIXES)
        downloads.append(Download(name, size, not partial))
    for name, size in sorted(found.items()):
        for suffix in PARTIAL_SUFFIXES:
            target = name[: -len(suffix)] if name.endswith(suffix) else ""
            if target and target not in found:
                downloads.append(Download(target, size, False))
    return downloads


class GuestCommand:
    """One `dispo-files` command in the guest, its answer read while it runs and capped while it is read.

    Two threads read its stdout and stderr as they come, each into a buffer of at most its cap: a guest that
    answers more (a listing of 1.5 GB, an endless error message: the user's shell startup files run before
    the command) is stopped at once, its pipes closed, and `finish` raises GuestOverflow (502, the guest's
    fault). stdin is written with a deadline, so a guest that stops reading cannot hold a host thread."""

    def __init__(self, io: GuestIO, args: Sequence[str], *, out_cap: int, err_cap: int = ERR_CAP) -> None:
        self.session_id, self.what = io.live.id, f"dispo-files {args[0]}"
        self.io = io
        self._child = io.spawn(self.what, args, stdin_pipe=True, stderr=subprocess.PIPE)
        self.proc = self._child.proc
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.overflow = ""  # the stream that passed its cap
        self._lock = threading.Lock()
        self._done = False
        self._out = _Capped("stdout", self.proc.stdout, out_cap, self._overflowed)
        self._err = _Capped("stderr", self.proc.stderr, err_cap, self._overflowed)

    def _overflowed(self, stream: str) -> None:
        with self._lock:
            self.overflow = self.overflow or stream
            if not self._done:
                self.proc.kill()  # the channel stops here: nothing more of this answer is read

    def write(self, data: bytes, timeout: float) -> None:
        """All of `data` into the command's stdin; GuestIOError if the guest takes none of it for `timeout`
        seconds or ended (what it said then is in the error)."""
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while view:
            if not poller.poll(timeout * 1000):
                raise GuestIOError(f"session {self.session_id}: the guest took no data for '{self.what}' in "
                                   f"{timeout:g} s")
            try:
                n = os.write(fd, view[:CHUNK])
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.finish(COMMAND_TIMEOUT_S)  # raises what the guest said, else:
                raise GuestIOError(f"session {self.session_id}: the guest stopped reading") from None
            view = view[n:]

    def finish(self, timeout: float) -> bytes:
        """Close stdin, wait for the command; its stdout, or the error it ended with."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise GuestIOError(f"session {self.session_id}: the guest did not answer '{self.what}' within "
                               f"{timeout:g} s") from None
        finally:
            with self._lock:
                self._done = True
        self._out.join()
        self._err.join()
        if self.overflow:
            cap = self._out.cap if self.overflow == "stdout" else self._err.cap
            raise GuestOverflow(f"session {self.session_id}: the guest answered '{self.what}' with more than {cap} "
                                f"bytes on its {self.overflow}; dispo stopped it there")
        rc = self.proc.returncode
        if rc != 0:
            detail = bytes(self._err.data).decode(errors="replace").strip().splitlines()
            reason = "".join(c if c.isprintable() else "?" for c in (detail[-1] if detail else ""))[:200]
            if rc == 3:
                raise NotFound(f"session {self.session_id}: no such file in the guest")
            raise GuestIOError(f"session {self.session_id}: '{self.what}' failed in the guest "
                               f"(status {rc}{': ' + reason if reason else ''})",
                               hint="the image may predate this dispo: rebuild it ('dispo image build NAME --force')")
        return bytes(self._out.data)

    def abort(self) -> None:
        """Stop the command if it still runs, and close its pipes (after `finish`, only the pipes). Its stdin
        ends first: a guest whose upload ends short of its size keeps nothing (files.sh), then it is killed."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with self._lock:
            running = not self._done
        if running:
            try:
                self.proc.wait(ABORT_GRACE_S)
            except subprocess.TimeoutExpired:
                with self._lock:
                    self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            with self._lock:
                self._done = True
            self._out.join(ABORT_GRACE_S)  # their pipes are closed below: not under a thread that reads them
            self._err.join(ABORT_GRACE_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.io.reaped(self._child)


class _Capped:
    """A thread that reads one pipe into `data`, `cap` bytes at most; past it, `on_overflow` and no more."""

    def __init__(self, name: str, stream: IO[bytes], cap: int, on_overflow: Callable[[str], None]) -> None:
        self.name, self.cap, self.data = name, cap, bytearray()
        self._stream, self._on_overflow = stream, on_overflow
        self._thread = threading.Thread(target=self._read, name=f"dispo-guest-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(self._stream.fileno(), CHUNK):
                if len(self.data) + len(chunk) > self.cap:
                    self._on_overflow(self.name)
                    return
                self.data += chunk

    def join(self, timeout: float = COMMAND_TIMEOUT_S) -> None:
        self._thread.join(timeout)


class Upload:
    """One upload under way (GuestIO.begin_upload): the body streamed into the guest's `dispo-files put`."""

    def __init__(self, cmd: GuestCommand, size: int, release: Callable[[], None]) -> None:
        self._cmd, self.size, self.received = cmd, size, 0
        self._release: Callable[[], None] | None = release

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.size:
            raise InvalidInput(f"the upload brought more than the {self.size} bytes it announced")
        with self._cmd.io.conflict_if_ending():
            self._cmd.write(chunk, COMMAND_TIMEOUT_S)

    def finish(self) -> str:
        """The name the file got in ~/Uploads, once the guest has all of it."""
        if self.received != self.size:
            raise InvalidInput(f"the upload ended after {self.received} of the {self.size} bytes it announced",
                               hint="send the whole file")
        try:
            with self._cmd.io.conflict_if_ending():
                return self._cmd.finish(COMMAND_TIMEOUT_S).decode(errors="replace")
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop it (the guest keeps nothing of an upload that did not finish); idempotent."""
        self._cmd.abort()
        release, self._release = self._release, None
        if release is not None:
            release()


class Channel(Protocol):
    """What GuestIO needs of the way into the guest (runtime/machinery.py's GuestChannel): a host argv."""

    def command(self, argv: Sequence[str], *, tty: bool = False) -> list[str]: ...


class Policy(Protocol):
    """What GuestIO reads of the session's request: the features its profile allows."""

    @property
    def features(self) -> Features: ...


class Session(Protocol):
    """What GuestIO reads of its session (runtime/live.py's LiveSession, which makes it), and no more: so this
    module knows nothing of how a session runs, and a test can stand in for one."""

    @property
    def id(self) -> str: ...

    @property
    def request(self) -> Policy: ...

    @property
    def channel(self) -> Channel | None: ...  # once the guest answered

    @property
    def journal(self) -> Journal | None: ...  # where each guest command's process is recorded while it runs

    @property
    def cancel(self) -> CancelToken: ...

    @property
    def state(self) -> str: ...

    @property
    def ended(self) -> bool: ...

    def touch(self) -> None: ...  # someone used the session: its idle timer starts again


class GuestIO:
    """The operations on one running session (its channel is there once the guest answered). `service`: the
    [service] settings that bound a request body's pace (dispod's, or the defaults)."""

    def __init__(self, live: Session, service: ServiceConfig | None = None) -> None:
        self.live = live
        self._service = service or ServiceConfig()
        self._uploads = threading.BoundedSemaphore(UPLOADS_PER_SESSION)

    # -- plumbing ---------------------------------------------------------------------------------
    def _ending(self) -> bool:
        """Asked to end (DELETE, a timeout), or its app ended: its guest is going away."""
        return self.live.ended or self.live.cancel.is_set() or self.live.state in ("stopping", "ended")

    def _gone(self) -> Conflict:
        return Conflict(f"session {self.live.id} is ending: its guest takes no more requests",
                        hint="start a new session")

    def _argv(self, *args: str) -> list[str]:
        channel = self.live.channel
        # The session exists and its state does not allow this: 409 (a 404 would say there is no session).
        if self._ending():
            raise self._gone()
        if channel is None or self.live.journal is None:
            raise Conflict(f"session {self.live.id} has no running guest yet", hint="wait until the session is ready")
        return channel.command([guest.FILES_PATH, *args])

    def spawn(self, what: str, args: Sequence[str], *, stdin_pipe: bool, stderr: int) -> processes.Spawned:
        """The host process of one guest command (`dispo-files ARGS`), its stdout a pipe, its stdin a pipe or
        /dev/null. It dies with the thread that starts it: dispod's event loop or a worker of its pool, the
        CLI's downloads thread, or a sound stream's own thread; each outlives the command. So a dispod killed
        with -9 leaves none."""
        argv, journal = self._argv(*args), self.live.journal
        assert journal is not None  # _argv checked it
        started: list[subprocess.Popen[bytes]] = []
        try:
            return processes.spawn_recorded(journal, argv, what=what, stdin_pipe=stdin_pipe, stdout=subprocess.PIPE,
                                            stderr=stderr, on_spawn=started.append, term_timeout="1")
        except JournalError:  # the session is ending: the gate exits without running the command
            for proc in started:
                end_child(proc)
            raise self._gone() from None

    def reaped(self, child: processes.Spawned) -> None:
        """A guest command's process has ended and been reaped: it leaves the session's journal."""
        journal = self.live.journal
        if journal is not None and child.proc.returncode is not None:
            journal.gone(child.entry)

    def _run(self, *args: str, data: bytes = b"", cap: int = MIB, timeout: float = COMMAND_TIMEOUT_S) -> bytes:
        cmd = GuestCommand(self, args, out_cap=cap)
        try:
            with self.conflict_if_ending():
                if data:
                    cmd.write(data, timeout)
                return cmd.finish(timeout)
        finally:
            cmd.abort()

    @contextlib.contextmanager
    def conflict_if_ending(self) -> Iterator[None]:
        """A guest command that fails because its session is ending is the caller's late request (409, Conflict),
        not the guest's failure (502); an overflow stays the guest's fault."""
        try:
            yield
        except GuestOverflow:
            raise
        except GuestIOError:
            if self._ending():
                raise self._gone() from None
            raise

    def _policy(self) -> Features:
        self.live.touch()
        return self.live.request.features

    # -- downloads --------------------------------------------------------------------------------
    def downloads(self) -> list[Download]:
        if not self._policy().downloads:
            raise Refused(f"session {self.live.id}: downloads are turned off by its profile",
                          hint="set [downloads] enabled = true in the profile")
        return parse_listing(self._run("list", cap=MAX_LISTED * (MAX_NAME_BYTES + 20)))

    def download(self, name: str) -> Download:
        """One listed download, complete and within the cap (else NotFound, Refused or TooLarge)."""
        try:
            check_guest_name(name)
        except InvalidInput:
            if not name or name in (".", "..") or "/" in name or "\0" in name:
                raise
            # Only longer than 255 bytes: a file name, but none the guest can have (the API's schema counts
            # characters, not bytes).
            raise NotFound(f"session {self.live.id} has no download named {name[:80]!r}",
                           hint=f"list them: GET /v1/sessions/{self.live.id}/downloads") from None
        for d in self.downloads():
            if d.name == name:
                if not d.complete:
                    raise NotFound(f"session {self.live.id}: download {name!r} is not complete yet",
                                   hint="list the downloads again once it is complete")
                cap = self._policy().downloads_max_mib * MIB
                if d.size > cap:
                    raise TooLarge(f"download {name!r} has {d.size} bytes, more than the profile's "
                                   f"[downloads] max_mib ({cap // MIB} MiB)")
                return d
        raise NotFound(f"session {self.live.id} has no download named {name[:80]!r}",
                       hint=f"list them: GET /v1/sessions/{self.live.id}/downloads")

    @contextlib.contextmanager
    def open_download(self, d: Download) -> Iterator[Iterator[bytes]]:
        """The bytes of a (checked) download, in chunks; never more than its listed size (a guest that
        grows the file meanwhile is cut off), and an error if fewer arrive."""
        child = self.spawn("dispo-files get", ("get", d.name), stdin_pipe=False, stderr=subprocess.DEVNULL)
        proc = child.proc

        def chunks() -> Iterator[bytes]:
            assert proc.stdout is not None
            left = d.size
            while left > 0:
                data = os.read(proc.stdout.fileno(), min(CHUNK, left))
                if not data:
                    raise GuestIOError(f"session {self.live.id}: download {d.name!r} ended {left} bytes short "
                                       f"(changed in the guest meanwhile?)")
                left -= len(data)
                yield data

        try:
            yield chunks()
        finally:
            end_child(proc)
            self.reaped(child)

    # -- uploads ----------------------------------------------------------------------------------
    def begin_upload(self, name: str, size: int) -> Upload:
        """An upload of `size` bytes into the guest's ~/Uploads under `name` (made safe), streamed: the caller
        `write`s the body as it arrives and `finish`es, or `abort`s. Refused (Busy) past UPLOADS_PER_SESSION
        uploads at once in this session or UPLOADS_PER_PROCESS in this process: each holds a guest command and
        up to a chunk of the body, never the body."""
        policy = self._policy()
        if not policy.uploads:
            raise Refused(f"session {self.live.id}: uploads are turned off by its profile",
                          hint="set [uploads] enabled = true in the profile")
        if size > policy.uploads_max_mib * MIB:
            raise TooLarge(f"the upload has {size} bytes, more than the profile's [uploads] max_mib "
                           f"({policy.uploads_max_mib} MiB)")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES:  # as openapi.UPLOAD_NAME says
            raise InvalidInput(f"an upload needs a file name of 1 to {MAX_NAME_BYTES} characters",
                               hint="POST the file's bytes as the body, with ?name=FILENAME")
        safe = host_name(name, "upload")  # a dropped file's name, made one harmless file name
        if not self._uploads.acquire(blocking=False):
            raise Busy(f"session {self.live.id} has {UPLOADS_PER_SESSION} uploads under way already",
                       hint="send the file when one of them has finished")
        if not _ALL_UPLOADS.acquire(blocking=False):
            self._uploads.release()
            raise Busy(f"{UPLOADS_PER_PROCESS} uploads are under way already (in all sessions)",
                       hint="send the file when one of them has finished")
        try:
            # The size goes along: a guest whose stdin ends early (an aborted upload) keeps nothing.
            cmd = GuestCommand(self, ("put", safe, str(size)), out_cap=4 * MAX_NAME_BYTES)
        except BaseException:
            self._uploads.release()
            _ALL_UPLOADS.release()
            raise
        return Upload(cmd, size, self._release_upload)

    def _release_upload(self) -> None:
        self._uploads.release()
        _ALL_UPLOADS.release()

    def body_limits(self) -> tuple[float, int]:
        """(seconds, bytes per second): a request body (an upload, clipboard text) must arrive within the
        seconds plus one more for each that many bytes it brought ([service] body_timeout_s, body_min_kib_s)."""
        service = self._service
        return float(max(1, service.body_timeout_s)), max(1, service.body_min_kib_s) * 1024

    # -- clipboard --------------------------------------------------------------------------------
    def clipboard(self) -> str:
        policy = self._policy()
        if not policy.clipboard_from_guest:
            raise Refused(f"session {self.live.id}: its profile keeps the guest's clipboard in the guest",
                          hint="set [clipboard] from_guest = true in the profile")
        return self._run("clip-get", cap=policy.clipboard_max_bytes).decode(errors="replace")

    def set_clipboard(self, text: str) -> None:
        policy = self._policy()
        if not policy.clipboard_to_guest:
            raise Refused(f"session {self.live.id}: its profile does not let the clipboard into the guest",
                          hint="set [clipboard] to_guest = true in the profile")
        data = text.encode()
        if len(data) > policy.clipboard_max_bytes:
            raise TooLarge(f"the clipboard text has {len(data)} bytes, more than the profile's [clipboard] "
                           f"max_bytes ({policy.clipboard_max_bytes})")
        self._run("clip-set", data=data, cap=0)

    # -- sound ------------------------------------------------------------------------------------
    def sound(self) -> SoundStream:
        """The guest's sound (s16le, 48 kHz, stereo), not started yet; Refused when the profile has none,
        Conflict without a running guest."""
        if not self._policy().audio:
            raise Refused(f"session {self.live.id} has no sound: its profile says audio = false",
                          hint="set audio = true in the profile")
        self._argv("sound")  # the same checks as every guest command, before the listener is answered
        return SoundStream(self)


_ALL_UPLOADS = threading.BoundedSemaphore(UPLOADS_PER_PROCESS)


def end_child(proc: subprocess.Popen[bytes]) -> None:
    """Kill a guest command's process if it still runs, reap it, close its pipes."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class SoundStream:
    """The guest's `dispo-files sound` while someone listens. Its process may run for hours, so a thread of its
    own starts it and owns it for its whole life (the process dies with that thread, and with dispod), reads
    it and hands each chunk to `deliver`, at the listener's pace. A `deliver` that raises (the listener left)
    ends the stream; `ended` is called once it is over, however it ends."""

    def __init__(self, io: GuestIO) -> None:
        self._io = io
        self._lock = threading.Lock()
        self._child: processes.Spawned | None = None
        self._closed = False
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, deliver: Callable[[bytes], None], ended: Callable[[], None]) -> None:
        """Once its process runs (journaled); Conflict when the guest is gone meanwhile."""
        self._thread = threading.Thread(target=self._run, args=(deliver, ended), daemon=True,
                                        name=f"dispo-sound-{self._io.live.id}")
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self, deliver: Callable[[bytes], None], ended: Callable[[], None]) -> None:
        try:
            child = self._io.spawn("dispo-files sound", ("sound",), stdin_pipe=False,
                                   stderr=subprocess.DEVNULL)
        except BaseException as e:  # handed to start(), in the caller's thread
            self._error = e
            self._started.set()
            ended()
            return
        with self._lock:
            self._child = child
            closed = self._closed
        self._started.set()
        try:
            assert child.proc.stdout is not None
            fd = child.proc.stdout.fileno()
            while not closed and (data := os.read(fd, SOUND_FRAME)):
                deliver(data)
        except Exception as e:  # the listener left (or its connection broke): the stream ends
            log.debug("session %s: sound stream ended: %s", self._io.live.id, e)
        finally:
            end_child(child.proc)
            self._io.reaped(child)
            ended()

    def close(self) -> None:
        """Stop it (its process is killed) and wait for its thread; idempotent."""
        with self._lock:
            self._closed = True
            child = self._child
        if child is not None and child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()  # its thread reaps it
        if self._thread is not None:
            self._thread.join(COMMAND_TIMEOUT_S)
