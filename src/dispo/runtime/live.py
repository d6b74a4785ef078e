"""LiveSession: one session from request to receipt, run on its own thread, stopped by reason.

States: starting -> running -> stopping -> ended (or starting -> stopping -> ended when it fails or is
stopped while it starts). Stopping is explicit: `stop(reason)` sets a cancel token that the steps and
the supervisor check; no exception is raised into the session by a signal handler. The session's journal
lock is held by this process from the first step until everything is undone.

The session runs the steps of its plan (runtime/plan.py) over one bring-up record (steps.Bringup) and
reads what they found from it (its guest's address and channel, its VMM, its viewer URL, what it keeps);
no step writes into the session.

What a session needs of the runtime that runs it (`Host`) and of whoever serves its web display
(`ViewerHost`) are protocols here: the runtime (dispo.runtime's Runtime) implements the first, the CLI and
dispod hand in the second (web/viewers.py), and neither is imported by this module.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from dispo import receipt
from dispo.config import Config
from dispo.errors import Cancelled, DispoError, NotClean, TeardownError, to_problem
from dispo.infra.journal import Journal
from dispo.infra.txn import Transaction, transaction
from dispo.net.capture import RequestLog
from dispo.runtime.cancel import CancelToken
from dispo.runtime.events import EndKind, Event, EventKind, EventSink, encode_output
from dispo.runtime.guestio import GuestIO
from dispo.runtime.machinery import GuestChannel, Machinery
from dispo.runtime.request import SessionRequest
from dispo.runtime.steps import Bringup, Handover, Origin, Steps, supervise
from dispo.storage.images import Image
from dispo.storage.recordings import Recording
from dispo.storage.templates import Template

log = logging.getLogger(__name__)


class SessionState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    ENDED = "ended"


class ViewerHost(Protocol):
    """Who serves a session's web display (web/viewers.py: `dispo run`'s own viewers, or dispod's routes).
    `reserve` may give the URL before the display is up (dispod does, so POST /v1/sessions answers with it);
    `publish` serves it and returns the URL; `withdraw` stops serving it (a page may still ask how it ended)."""

    def reserve(self, live: LiveSession) -> str | None: ...

    def publish(self, live: LiveSession, vnc_socket: Path) -> str: ...

    def withdraw(self, session_id: str) -> None: ...


class AutomationHost(Protocol):
    """Who serves a session's automation endpoint (web/automation.py: dispod's relay). `reserve` gives its URL
    when the session is announced (POST /v1/sessions answers with it); `withdraw` ends it and every
    connection it relays."""

    def reserve(self, live: LiveSession) -> str | None: ...

    def withdraw(self, session_id: str) -> None: ...


class Host(Protocol):
    """What a session needs of the runtime that runs it (dispo.runtime's Runtime)."""

    @property
    def cfg(self) -> Config: ...

    @property
    def machinery(self) -> Machinery: ...

    @property
    def viewers(self) -> ViewerHost | None: ...

    @property
    def automation(self) -> AutomationHost | None: ...

    @property
    def owner(self) -> str: ...  # who runs it, for the journal (a dead owner's sessions are reclaimed)

    def events(self, event: Event) -> None: ...  # every session's events, to the runtime's subscribers

    def forget(self, live: LiveSession) -> None: ...  # it ended: kept a while for its exit status


class LiveSession:
    def __init__(self, runtime: Host, request: SessionRequest, session_id: str, *, steps: Steps,
                 origin: Origin = Origin.BOOT, template: Template | None = None, why: str = "",
                 sink: EventSink | None = None) -> None:
        """`steps`, `origin`, `template` and `why`: the session's plan (runtime/plan.py), which the runtime made."""
        self.runtime = runtime
        self.request = request
        self.id = session_id
        self.steps = steps
        self.created = time.time()
        self.state = SessionState.STARTING
        self.exit_status: int | None = None
        self.end_reason = ""
        self.end_kind: EndKind | None = None  # how it ended, once it did (end_reason in words for the log)
        self.error: DispoError | None = None
        self.step = ""
        self.ended_at: float | None = None  # when everything was removed (time.time()), for its duration
        self.origin = origin  # where its guest comes from: booted, restored, or handed from the pool
        self.template = template.key if template is not None else ""  # restored from it
        self.start_reason = why  # how its guest comes, and why (one line: the CLI prints it)
        self.pool_name = ""  # while it waits in the warm pool (runtime/pool.py): the name it waits for
        self.handover = Handover()  # a pooled guest's: given by claim(), awaited by the pool.hold step
        self.last_activity = time.monotonic()
        self.cancel = CancelToken()
        self.receipt: receipt.Receipt | None = None
        self.io = GuestIO(self, runtime.cfg.service)  # its downloads, uploads, clipboard and sound (runtime/guestio.py)
        self._reserved_url: str | None = None  # the viewer URL the runtime reserved before the app published
        self.automation_url: str | None = None  # with request.automation: its endpoint, reserved by the runtime
        self._bringup: Bringup | None = None  # what the steps found and made (read here, written by them)
        self._tx: Transaction | None = None
        self._image: Image | None = None
        self._proof: dict[str, Any] | None = None
        self._stopping_at = 0.0
        self._sink = sink
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- what callers use -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"dispo-session-{self.id}", daemon=True)
        self._thread.start()

    def stop(self, reason: str, kind: EndKind = EndKind.USER) -> bool:
        """Ask the session to end (returns at once); False if it is already ending. Thread- and signal-safe.
        `kind`: who asked, for the status's end_kind."""
        if not self.cancel.set(reason, kind):
            return False
        with self._lock:
            if self.state in (SessionState.STARTING, SessionState.RUNNING):
                self._set_state(SessionState.STOPPING, reason)
        return True

    def claim(self, request: SessionRequest, sink: EventSink | None) -> bool:
        """A pooled session taken by `request` (its URL, command, name, limits; the template's machine): False
        when it is no longer waiting (stopped, failed, or taken)."""
        with self._lock:
            if not self.pool_name or self.cancel.is_set() or self.state is not SessionState.STARTING:
                return False
            self.request, self._sink, self.pool_name = request, sink, ""
            self.created = time.time()
            self.handover.give(request)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """True once the session ended and everything it made is gone (or reported left)."""
        return self._done.wait(timeout)

    def touch(self) -> None:
        """Someone used the session (viewer input, output, an API call): the idle timer starts again."""
        self.last_activity = time.monotonic()

    @property
    def journal(self) -> Journal | None:
        """The session's journal once its first step runs: what is made for it on demand (a guest command's
        process, runtime/guestio.py) is recorded there too, and undone with the session."""
        return self._tx.journal if self._tx is not None else None

    @property
    def ended(self) -> bool:
        return self._done.is_set()

    # -- what the steps found (the bring-up record) ---------------------------------------------------
    @property
    def warm(self) -> bool:
        """Restored from a template (or handed from the pool, restored too) rather than booted."""
        return self.origin is not Origin.BOOT

    @property
    def channel(self) -> GuestChannel | None:
        """The way into the guest, once it answered."""
        return self._bringup.channel if self._bringup is not None else None

    @property
    def address(self) -> str:
        return self.channel.address if self.channel is not None else ""

    @property
    def backend(self) -> str:
        vmm = self._bringup.vmm if self._bringup is not None else None
        return vmm.kind.value if vmm is not None else self.request.backend

    @property
    def accel(self) -> str:
        vmm = self._bringup.vmm if self._bringup is not None else None
        return vmm.accel.value if vmm is not None else ""

    @property
    def request_log(self) -> RequestLog | None:
        """With request.log_requests: the guest's requests."""
        return self._bringup.request_log if self._bringup is not None else None

    @property
    def kept(self) -> list[str]:
        """What the session keeps on purpose (a --keep volume), for the receipt."""
        return list(self._bringup.kept) if self._bringup is not None else []

    @property
    def recording(self) -> Recording | None:
        """With request.record, once the session ended: the video it kept (storage/recordings.py)."""
        return self._bringup.recording if self._bringup is not None else None

    @property
    def viewer_url(self) -> str | None:
        published = self._bringup.viewer_url if self._bringup is not None else None
        return published or self._reserved_url

    @viewer_url.setter
    def viewer_url(self, url: str | None) -> None:
        """The URL the viewer host reserved for this session before its app publishes a display."""
        self._reserved_url = url

    @property
    def automation_socket(self) -> Path | None:
        """With request.automation, once the app runs: its debugging port, forwarded to this unix socket."""
        return self._bringup.automation_socket if self._bringup is not None else None

    def status(self) -> dict[str, Any]:
        r = self.request
        url = self.automation_url if r.automation else None
        return {"id": self.id, "name": r.name or None, "profile": r.profile or None, "image": r.image,
                "display": r.display.value, "state": self.state.value, "step": self.step,
                "created": self.created, "age_s": round(time.time() - self.created, 1),
                "exit_status": self.exit_status, "end_reason": self.end_reason or None,
                "end_kind": self.end_kind.value if self.end_kind is not None and self.ended_at else None,
                "viewer_url": self.viewer_url, "address": self.address or None, "backend": self.backend,
                "accel": self.accel or None, "error": to_problem(self.error) if self.error else None,
                "start": self.origin.value, "steps": list(self.steps.names), "ended": self.ended_at,
                "receipt": self.receipt.summary() if self.receipt is not None else None,
                "pooled": bool(self.pool_name), "template": self.template or None,
                "start_reason": self.start_reason or None,
                "idle_timeout_s": r.idle_timeout_s, "max_lifetime_s": r.max_lifetime_s,
                "features": r.features.to_json(), "keep": r.keep or None,
                "requests": self.request_log.requests() if self.request_log is not None else None,
                "record": r.record,
                "recording": self.recording.to_json() if self.recording is not None else None,
                "cdp_url": url if r.automation == "cdp" else None,
                "bidi_url": url if r.automation == "bidi" else None}

    # -- for the steps ----------------------------------------------------------------------------
    def emit(self, kind: EventKind, message: str = "", **fields: Any) -> None:
        event = Event(kind, self.id, message, fields)
        if self._sink is not None:
            self._sink(event)
        self.runtime.events(event)

    def output(self, stream: str, data: bytes) -> None:
        self.touch()
        self.emit(EventKind.OUTPUT, "", stream=stream, data=encode_output(data))

    # -- the session's thread ---------------------------------------------------------------------
    def _set_state(self, state: SessionState, reason: str = "") -> None:
        self.state = state
        self.emit(EventKind.STATE, f"{state.value}" + (f": {reason}" if reason else ""), **self.status())

    def _run(self) -> None:
        try:
            self._life()
        except Cancelled as e:
            self.end_reason, self.end_kind = e.reason, self.cancel.kind
        except DispoError as e:
            self.error = e
            self.end_reason = self.end_reason or f"failed: {e.one_line()}"
            self.end_kind = EndKind.FAILED
        except BaseException as e:  # a bug: still end the session cleanly and say so
            log.exception("session %s", self.id)
            self.error = DispoError(f"internal error: {type(e).__name__}: {e}")
            self.end_reason = f"failed: {self.error.message}"
            self.end_kind = EndKind.FAILED
        try:
            self._dispose()
        except Exception as e:  # the receipt is a check: its own failure is reported, not fatal
            log.exception("session %s: disposal receipt", self.id)
            self.error = self.error or DispoError(f"the disposal receipt could not be written: {e}")
        finally:
            with self._lock:
                self.state = SessionState.ENDED
                self.ended_at = time.time()
            self.end_kind = self.end_kind or (EndKind.FAILED if self.error else EndKind.USER)
            self.emit(EventKind.ENDED, self.end_reason, exit_status=self.exit_status, end_reason=self.end_reason,
                      end_kind=self.end_kind.value,
                      error=to_problem(self.error) if self.error else None,
                      console_tail=getattr(self.error, "console_tail", "") if self.error else "",
                      receipt=self.receipt.summary() if self.receipt else None,
                      requests=self.request_log.requests() if self.request_log is not None else None)
            self.emit(EventKind.STATE, f"ended: {self.end_reason}", **self.status())
            self._done.set()
            if self.runtime.automation is not None and self.request.automation:
                self.runtime.automation.withdraw(self.id)
            self.runtime.forget(self)

    def _life(self) -> None:
        r = self.request
        meta: dict[str, Any] = {"image": r.image, "name": r.name, "profile": r.profile, "request": r.to_json(),
                "owner": self.runtime.owner}
        with transaction(self.runtime.cfg, purpose="session", session_id=self.id, **meta) as tx:
            self._tx = tx
            try:
                viewers = self.runtime.viewers
                b = self._bringup = Bringup(
                    self.runtime.cfg, self.runtime.machinery, r, tx, self.cancel, self.emit,
                    publish=self._publish if viewers is not None else None, withdraw=self._withdraw,
                    output=self.output, status=self.status, handover=self.handover)
                for step in self.steps:
                    self.cancel.check()
                    self.step = step.name
                    t = time.monotonic()
                    try:
                        step.run(b)
                        if self._proof is None and b.image is not None:  # the image as the session found it
                            self._image, self._proof = b.image, receipt.image_proof(b.image)
                            tx.journal.set_meta(image_proof=self._proof)  # for a receipt if this owner dies
                    except DispoError:
                        self.cancel.check()  # stopped meanwhile: say so rather than the step's error
                        raise
                    self.emit(EventKind.STEP, step.name, step=step.name, seconds=round(time.monotonic() - t, 3))
                    fault_after(step.name)
                self.step = ""
                with self._lock:
                    if self.state is SessionState.STARTING:
                        self._set_state(SessionState.RUNNING)
                # A step list may end the session itself (a template build ends once it is saved).
                self.exit_status, self.end_reason, self.end_kind = (
                    (0, b.finished, EndKind.FINISHED) if b.finished else supervise(b, lambda: self.last_activity))
                with self._lock:
                    if self.state is not SessionState.STOPPING:
                        self._set_state(SessionState.STOPPING, self.end_reason)
            finally:
                self._stopping_at = time.monotonic()  # the teardown starts now

    def _publish(self, vnc_socket: Path) -> str:
        assert self.runtime.viewers is not None
        return self.runtime.viewers.publish(self, vnc_socket)

    def _withdraw(self) -> None:
        if self.runtime.viewers is not None:
            self.runtime.viewers.withdraw(self.id)

    def _dispose(self) -> None:
        """After the teardown, however it went: check object by object that all is gone; write the receipt.
        A receipt that is not clean is this session's error (unless it already has one)."""
        if self._tx is None:
            return  # nothing was ever created
        tx = self._tx
        self.receipt = receipt.issue(
            tx.cfg, session_id=self.id, recorded=list(tx.journal.recorded), state_path=tx.state_path,
            image=self._image, proof_before=self._proof, started=self.created,
            teardown_s=time.monotonic() - self._stopping_at if self._stopping_at else None,
            exit_status=self.exit_status, end_reason=self.end_reason or (self.error.one_line() if self.error else ""),
            requests=self.request_log.requests() if self.request_log is not None else None, kept=self.kept,
            recording=self.recording.to_json() if self.recording is not None else None)
        if not self.receipt.clean and self.error is None:
            self.error = NotClean(self.id, self.receipt.leftovers)


FAULT_ENV = "DISPO_FAULT_KILL_AFTER"


def fault_after(step: str) -> None:
    """Fault injection for the crash tests: with DISPO_FAULT_KILL_AFTER=<step name>, this process kills itself
    (SIGKILL: no teardown, no cleanup handler) right after that step of a session's bring-up."""
    if os.environ.get(FAULT_ENV) == step:
        log.warning("%s=%s: killing this process now", FAULT_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


def join_all(sessions: list[LiveSession], timeout: float, on_wait: Callable[[LiveSession], None] | None = None
             ) -> list[LiveSession]:
    """Wait for every session to end within `timeout` overall; those still running."""
    deadline = time.monotonic() + timeout
    left = []
    for s in sessions:
        if on_wait is not None:
            on_wait(s)
        if not s.wait(max(0.0, deadline - time.monotonic())):
            left.append(s)
    return left


__all__ = ["AutomationHost", "CancelToken", "Host", "LiveSession", "SessionState", "TeardownError", "ViewerHost",
           "join_all"]
