"""dispod's warm pool with fake machinery (tests/fakes.py): fill, hand-out (each guest once), refill, drain,
the memory budget, a changed template, and the API and CLI over it. Without root, in seconds."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dispo.client import pool_fill_call
from dispo.config import Config, pool_targets
from dispo.errors import ConfigError, InvalidInput, NotFound
from dispo.runtime import Runtime, build
from dispo.runtime.plan import Origin, plan
from dispo.runtime.pool import Pool
from tests import fakes
from tests.fakeworld import Running, cfg, leftovers, make_template, rt, serving

__all__ = ["cfg", "rt"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

SAFETY_S = 30.0


def _until(what: Callable[[], bool], why: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def _ready(pool: Pool, name: str) -> int:
    slots = pool.status(name)["slots"]
    return int(slots[0]["ready"]) if slots else 0


def test_fill_hand_out_once_refill_and_drain(rt: Runtime, cfg: Config) -> None:
    before = leftovers(cfg)
    make_template(rt)
    rt.pool = pool = Pool(rt, budget_mib=4096)
    with pytest.raises(NotFound, match="no template of profile 'chromium'"):
        pool.fill("chromium", 1)
    pool.fill("minimal", 1)
    _until(lambda: _ready(pool, "minimal") == 1, "the pool did not fill")
    waiting = rt.sessions(pooled=True)
    assert len(waiting) == 1 and waiting[0].pool_name == "minimal" and rt.sessions() == []  # not a user's session
    assert waiting[0].status()["pooled"] is True and rt.live_count == 0

    live = rt.start(build(cfg, image="minimal", command=["sh", "-c", "echo from the pool"]))
    assert live is waiting[0]  # the waiting guest, handed out
    assert live.wait(30) and live.error is None and live.exit_status == 0, live.error
    assert live.status()["start"] == "pool" and not live.status()["pooled"]
    # A new guest takes its place; the one handed out is gone for good.
    _until(lambda: _ready(pool, "minimal") == 1 and rt.sessions(pooled=True)[0].id != live.id, "no refill")
    second = rt.start(build(cfg, image="minimal", command=["true"]))
    assert second.id != live.id and second.wait(30) and second.error is None
    cold = rt.start(build(cfg, image="minimal", command=["true"], start="cold"))  # --cold never takes one
    assert cold.wait(30) and not cold.warm

    _until(lambda: _ready(pool, "minimal") == 1, "no refill")
    # A session that logs its requests is watched from its first frame: never a guest that waited unwatched.
    logged = plan(cfg, build(cfg, image="minimal", command=["true"], log_requests=True), pool)
    assert logged.origin is Origin.RESTORE and logged.guests == ()
    assert plan(cfg, build(cfg, image="minimal", command=["true"]), pool).origin is Origin.POOL
    stopped = pool.drain("minimal")
    assert len(stopped) == 1
    _until(lambda: rt.sessions(pooled=True) == [], "drain did not stop the guest")
    assert pool.status()["slots"][0]["target"] == 0
    pool.close()
    _until(lambda: leftovers(cfg) == before, f"left: {leftovers(cfg)} (was {before})")


def test_the_budget_and_a_changed_template(rt: Runtime, cfg: Config) -> None:
    make_template(rt)
    rt.pool = pool = Pool(rt, budget_mib=256)
    with pytest.raises(InvalidInput, match="needs 512 MiB, over the pool's budget of 256 MiB"):
        pool.fill("minimal", 1)
    pool.close()
    rt.pool = pool = Pool(rt, budget_mib=1024)  # room for two guests of 512 MiB, not three
    pool.fill("minimal", 3)
    _until(lambda: _ready(pool, "minimal") == 2, "the pool did not fill to its budget")
    time.sleep(1.5)  # a refill round or more: still two
    status = pool.status("minimal")
    slot = status["slots"][0]
    assert slot["ready"] == 2 and "memory budget (1024 MiB) is used up" in slot["last_error"]
    old = {s.id for s in rt.sessions(pooled=True)}
    make_template(rt)  # rebuilt: the waiting guests of the old one must never be handed out
    _until(lambda: old.isdisjoint({s.id for s in rt.sessions(pooled=True)}) and _ready(pool, "minimal") == 2,
           "the pool did not move to the new template")
    pool.close()


def test_pool_setting_is_checked() -> None:
    assert pool_targets("chromium=1, minimal=2") == {"chromium": 1, "minimal": 2}
    assert pool_targets("") == {}
    for bad in ("chromium", "chromium=x", "=1", "chromium=99"):
        with pytest.raises(ConfigError, match="is not NAME=COUNT"):
            pool_targets(bad)


def test_the_pool_through_the_api_and_the_cli(cfg: Config, tmp_path: Path) -> None:
    rt = Runtime(cfg, machinery=fakes.machinery())
    make_template(rt)
    before = leftovers(cfg)
    with serving(cfg) as svc:
        client = svc.tcp_client()
        assert client.pool()["slots"] == []
        with pytest.raises(NotFound):
            client.pool_fill("nothing-here", 1)
        filled = client.pool_fill("minimal", 1)
        assert filled["slots"][0]["target"] == 1
        _until(lambda: client.pool()["slots"][0]["ready"] == 1, "the pool did not fill")
        assert client.sessions() == []  # waiting guests are not sessions of anyone
        cli = _cli(svc, tmp_path, "pool", "ls")
        assert cli.returncode == 0 and "minimal" in cli.stdout and "image-minimal" in cli.stdout, cli.stderr
        created = client.create_session({"image": "minimal", "command": ["true"]})
        assert created["start"] == "pool"
        drained = client.pool_drain("minimal")
        assert drained["slots"][0]["target"] == 0
        with pytest.raises(InvalidInput, match="count"):
            client.send(dataclasses.replace(pool_fill_call("minimal", 1), json={"count": "one"}))
    assert leftovers(cfg) == before


def _cli(svc: Running, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispo", *args], env=fakes.env(tmp_path), capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
