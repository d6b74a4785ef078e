"""Where a session's guest comes from, decided in one place: `plan(cfg, request, pool)`.

    a guest waiting in the warm pool  ->  Origin.POOL     (it ran restore_steps + pool.hold already)
    a current template that fits      ->  Origin.RESTORE  (warm.restore_steps: BOOT edited); an automation
                                          session's fits only if it is an automation template (warm.py)
    otherwise, or --cold              ->  Origin.BOOT     (steps.BOOT)

The plan carries the step list and one line saying why (the CLI prints it); `Runtime.start` follows it and
the session keeps its `origin` as a field. `--warm` makes "no template" an error instead of a boot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dispo.config import Config
from dispo.errors import Conflict
from dispo.runtime.live import LiveSession
from dispo.runtime.request import SessionRequest, StartMode
from dispo.runtime.steps import BOOT, Origin, Steps
from dispo.runtime.warm import restore_steps, template_for
from dispo.storage.templates import Template


class Waiting(Protocol):
    """What a plan asks of the warm pool (runtime/pool.py's Pool, which starts its guests through the runtime
    and so sits above this module)."""

    def waiting(self, request: SessionRequest, t: Template) -> Sequence[LiveSession]: ...


@dataclass(frozen=True)
class Plan:
    origin: Origin
    steps: Steps
    template: Template | None = None
    why: str = ""                                 # one line: what was chosen and why ("" for the caller's own)
    guests: tuple[LiveSession, ...] = ()          # POOL: the waiting guests to claim, the best first
    otherwise: Plan | None = None                 # POOL: the plan should all of them be taken meanwhile


def given(steps: Steps) -> Plan:
    """The caller's own step list (a template build, a test's): a boot, whatever its steps."""
    return Plan(Origin.BOOT, steps)


def plan(cfg: Config, request: SessionRequest, pool: Waiting | None = None) -> Plan:
    """A guest from the pool when one of a fitting template waits, else a restore when a current template
    fits (unless --cold), else a boot; --warm makes "no template" an error."""
    if request.start is StartMode.COLD:
        return Plan(Origin.BOOT, BOOT, why="booting cold (--cold)")
    t, why = template_for(cfg, request)
    if t is None:
        if request.start is StartMode.WARM:
            # A fine request that the templates at hand cannot serve: 409, not 400.
            raise Conflict(f"cannot start warm: {why}", hint="drop --warm to boot cold")
        return Plan(Origin.BOOT, BOOT, why=f"booting cold: {why}")
    # An automation session restores only from an automation template (template_for): its browser was saved
    # with the debugging port on the guest's loopback; the forward to it is made now, in the app step.
    port = ("; its browser was saved with its debugging port, forwarded to this session alone at restore"
            if request.automation else "")
    restore = Plan(Origin.RESTORE, restore_steps(t), t,
                   f"restoring from template {t.key} (made {_age(t.created)} ago{port})")
    # A pooled guest's traffic was not watched from its first frame: a request that logs it gets its own.
    guests = pool.waiting(request, t) if pool is not None and not request.log_requests else []
    if guests:
        return Plan(Origin.POOL, restore.steps, t,
                    f"handed a guest from the warm pool (restored from template {t.key}, never used)",
                    tuple(guests), restore)
    return restore


def _age(created: float) -> str:
    s = max(0.0, time.time() - created)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


__all__ = ["Origin", "Plan", "given", "plan"]
