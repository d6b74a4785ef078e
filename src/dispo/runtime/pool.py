"""The warm pool (dispod): per template, a target count of guests restored from it and held paused, handed
to one session each and never reused; refilled in the background within a memory budget.

A pooled guest is an ordinary session whose steps are the restore steps (BOOT edited, runtime/warm.py) with
`pool.hold` inserted after `guest.ready`: it is restored (disk clone, network, memory), given its own
identity by its agent (entropy and RNG reseed, hostname, SSH keys, address: none of it depends on who will
use it), checked ready over SSH, and then waits with its vCPUs paused. runtime/plan.py decides that a
request takes one (`waiting`: the guests of the template that fits it) and `hand_out` gives it: the session
takes the caller's request, the guest resumes with its clock stepped to the host's (it stood still while
paused), and goes on with `app`. So a pooled guest has never seen any user's traffic, and every hand-out is
a clone nobody used.

A slot is named as a template is: "chromium" (the profile's template) or "chromium+automation" (its
automation template, whose guests serve automation sessions only, each given the forward to its browser's
debugging port when handed out: the app step runs after the hand-out).

The pool is drained (its guests stopped and torn down like any session) on `drain`, on shutdown, and when a
template changes (rebuilt or stale): a guest of an older template is never handed out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispo.config import Config
from dispo.errors import InvalidInput, NotFound
from dispo.guest import agent
from dispo.runtime import record, warm
from dispo.runtime.events import EndKind, EventKind, EventSink
from dispo.runtime.live import LiveSession
from dispo.runtime.plan import Origin, Plan
from dispo.runtime.request import SessionRequest
from dispo.runtime.steps import Bringup, Step, Steps
from dispo.settings import host_memory_mib
from dispo.storage.templates import AUTOMATION, Template, TemplateStore, split_name

log = logging.getLogger(__name__)

REFILL_EVERY_S = 1.0
RETRY_AFTER_S = 30.0     # after a pooled guest failed to restore, before the next try
DRAIN_REASON = "drained from the warm pool"


def default_budget_mib() -> int:
    """A quarter of the host's memory: pooled guests hold their RAM while they wait."""
    return max(0, host_memory_mib() // 4)


def hold(b: Bringup) -> None:
    """Wait, ready and paused, until a session claims this guest (or the pool stops it); then resume it with
    its clock stepped to the host's."""
    vmm, channel = b.vmm, b.channel
    assert vmm is not None and channel is not None
    vmm.pause()  # a waiting guest takes no CPU
    b.emit(EventKind.STATE, "pooled", **b.status())
    while not b.handover.given.wait(0.2):
        b.cancel.check()
        if not vmm.running():
            raise vmm.failure("the pooled guest's VMM exited while it waited")
    b.cancel.check()
    assert b.handover.request is not None
    b.request = b.handover.request  # the caller's: its URL, command, name, limits
    vmm.resume()
    if b.agent is not None:  # the guest's agent link is held (its channel takes one connection at a time)
        agent.step_clock(b.agent)
    else:
        b.machinery.step_clock(vmm, b.request.ready_timeout_s, b.alive)
    # Ready was said while it filled, to nobody: say it again to the session's owner.
    took = max(0.0, time.time() - b.handover.at)
    b.emit(EventKind.READY, f"ready in {took:.1f} s (guest {channel.address}, {vmm.kind.value}/{vmm.accel.value}, "
                            f"from the warm pool)", address=channel.address, backend=vmm.kind.value,
           accel=vmm.accel.value, ready_s=round(took, 3), start="pool")


HOLD = Step("pool.hold", hold)


def pool_steps(t: Template) -> Steps:
    """The restore from `t` held, ready, before its app: the app is the claiming request's, and so is
    whether its display is recorded (the recorder's step does nothing unless the request asks)."""
    return record.with_recording(warm.restore_steps(t).insert_after("guest.ready", HOLD))


@dataclass
class Slot:
    """One name (a profile or an image) in the pool."""

    name: str
    target: int = 0
    guests: list[LiveSession] = field(default_factory=list)
    template: Template | None = None
    last_error: str = ""
    retry_at: float = 0.0

    def summary(self) -> dict[str, Any]:
        held = [g for g in self.guests if g.step == HOLD.name]
        return {"name": self.name, "target": self.target, "ready": len(held),
                "starting": len(self.guests) - len(held),
                "template": self.template.key if self.template else None,
                "memory_mib": sum(g.request.memory_mib for g in self.guests), "last_error": self.last_error or None}


class Starter(Protocol):
    """What the pool needs of the runtime (dispo.runtime's Runtime, which holds the pool): its config, and
    sessions started on the pool's plan."""

    @property
    def cfg(self) -> Config: ...

    def start(self, request: SessionRequest, *, plan: Plan, pooled: str) -> LiveSession: ...


class Pool:
    def __init__(self, runtime: Starter, *, budget_mib: int | None = None,
                 targets: dict[str, int] | None = None) -> None:
        self.rt = runtime
        self.budget_mib = default_budget_mib() if budget_mib is None else budget_mib
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        for name, count in (targets or {}).items():
            self._slots[name] = Slot(name, count)
        self._thread = threading.Thread(target=self._loop, name="dispo-pool", daemon=True)
        self._thread.start()

    # -- what dispod calls ----------------------------------------------------------------------------
    def fill(self, name: str, count: int) -> dict[str, Any]:
        """Keep `count` guests of NAME's template ready (0 drains it)."""
        if not 0 <= count <= 64:
            raise InvalidInput(f"pool count {count} is out of range: give 0 to 64")
        req, kind = warm.build_request(self.rt.cfg, name)
        base, automation = split_name(name)
        t = TemplateStore(self.rt.cfg).find(kind, base, automation=automation)
        if t is None and count:
            what = "automation template" if automation else "template"
            raise NotFound(f"no {what} of {kind.value} {base!r} to fill the pool from",
                           hint=f"build one with 'dispo template build {base}{' --automation' if automation else ''}'")
        if count and req.memory_mib > self.budget_mib:
            raise InvalidInput(f"one guest of {name!r} needs {req.memory_mib} MiB, over the pool's budget of "
                               f"{self.budget_mib} MiB", hint="raise [service] pool_memory_mib in the config")
        with self._lock:
            slot = self._slots.setdefault(name, Slot(name))
            slot.target, slot.last_error, slot.retry_at = count, "", 0.0
        self._wake.set()
        return self.status(name)

    def drain(self, name: str | None = None) -> list[str]:
        """Stop the waiting guests (of NAME, or all) and set their target to 0; their ids."""
        with self._lock:
            slots = [self._slots[name]] if name is not None and name in self._slots else (
                [] if name is not None else list(self._slots.values()))
            if name is not None and not slots:
                raise NotFound(f"nothing of {name!r} in the pool", hint="see 'dispo pool ls'")
            stopped = []
            for slot in slots:
                slot.target = 0
                for g in slot.guests:
                    if g.pool_name and g.stop(DRAIN_REASON, EndKind.POOL):
                        stopped.append(g.id)
                slot.guests = [g for g in slot.guests if not g.pool_name]
        return stopped

    def status(self, name: str | None = None) -> dict[str, Any]:
        with self._lock:
            self._prune()
            slots = [s.summary() for s in self._slots.values() if name is None or s.name == name]
            return {"budget_mib": self.budget_mib, "used_mib": self._used(), "slots": slots}

    def waiting(self, request: SessionRequest, t: Template) -> list[LiveSession]:
        """The guests of template `t` (as it is now) waiting for a request like `request`, ready ones first.
        Whether the request should take one is runtime/plan.py's to say."""
        with self._lock:
            slot = self._slots.get((request.profile or request.image) + (AUTOMATION if request.automation else ""))
            if slot is None or slot.template is None or (slot.template.key, slot.template.created) != (
                    t.key, t.created):
                return []  # the template changed: the loop drains the old one's guests
            return sorted((g for g in slot.guests if g.pool_name and not g.cancel.is_set()
                           and g.request.policy == request.policy), key=lambda g: g.step != HOLD.name)

    def hand_out(self, guest: LiveSession, request: SessionRequest, sink: EventSink | None) -> bool:
        """`guest` claimed by `request`, out of the pool for good; False when it is no longer waiting."""
        with self._lock:
            if not guest.claim(request, sink):
                return False
            for slot in self._slots.values():
                if guest in slot.guests:
                    slot.guests.remove(guest)
            self._wake.set()  # refill
        return True

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.drain()

    # -- the refill loop ----------------------------------------------------------------------------
    def _used(self) -> int:
        return sum(g.request.memory_mib for s in self._slots.values() for g in s.guests)

    def _prune(self) -> None:
        for slot in self._slots.values():
            for g in slot.guests:
                if g.ended and g.error is not None and g.pool_name:
                    slot.last_error = g.error.one_line()
                    slot.retry_at = time.monotonic() + RETRY_AFTER_S
            slot.guests = [g for g in slot.guests if not g.ended]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(REFILL_EVERY_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._refill()
            except Exception:  # the pool must outlive one bad round (a template removed meanwhile, ...)
                log.exception("warm pool refill")

    def _refill(self) -> None:
        with self._lock:
            self._prune()
            for slot in self._slots.values():
                if slot.target == 0:
                    continue
                try:
                    req, _ = warm.build_request(self.rt.cfg, slot.name)
                    t, why = warm.template_for(self.rt.cfg, req)
                except Exception as e:  # a profile or image removed meanwhile
                    t, why = None, str(getattr(e, "message", e))
                    req = None
                current = (t.key, t.created) if t is not None else None
                if slot.template is not None and (slot.template.key, slot.template.created) != current:
                    for g in slot.guests:  # the template changed: its guests must not be handed out
                        g.stop("the template changed", EndKind.POOL)
                    slot.guests = []
                slot.template = t
                if t is None or req is None:
                    slot.last_error = why
                    continue
                if len(slot.guests) >= slot.target or time.monotonic() < slot.retry_at:
                    continue
                if self._used() + req.memory_mib > self.budget_mib:
                    slot.last_error = (f"the pool's memory budget ({self.budget_mib} MiB) is used up "
                                       f"({self._used()} MiB held)")
                    continue
                live = self.rt.start(req, plan=Plan(Origin.RESTORE, pool_steps(t), t), pooled=slot.name)
                slot.guests.append(live)
                self._wake.set()  # one at a time, then look again
                return


__all__ = ["HOLD", "Pool", "Starter", "default_budget_mib", "hold", "pool_steps"]
