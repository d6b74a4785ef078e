"""Worlds with fake machinery (tests/fakes.py), shared by the fast and root tiers: a config on a scratch
workspace, a Runtime, a dispod served from a thread (or run as a process), and the listing of what sessions may
leave behind.

The fixtures here (cfg, rt, svc) share names with conftest's storage `cfg` on purpose: a module that works on
fakes imports them (`from tests.fakeworld import cfg`), and they stand in for conftest's in that module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from dispo.cli import run
from dispo.client import DispodClient
from dispo.config import Config
from dispo.daemon.dispod import Dispod, Options
from dispo.runtime import Event, EventKind, Runtime, warm
from dispo.runtime.machinery import Machinery
from dispo.web.guard import Limits
from dispo.web.viewers import StandaloneViewers
from tests import fakes

SAFETY_S = 60.0  # a bound so a broken test fails instead of hanging; never an assertion about speed


def fake_vmms_of(cfg: Config) -> list[int]:
    """This world's fake VMM processes (their console, stdout, is in its state dir); not those of other tests
    that may run at the same time on this machine."""
    mine = []
    for pid in fakes.fake_vmm_pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/1").startswith(f"{cfg.state_dir}/"):
                mine.append(pid)
    return mine


def leftovers(cfg: Config) -> dict[str, list[str]]:
    """What sessions may leave, listed without asking dispo."""
    sessions = cfg.state_dir / "sessions"
    return {"journals": sorted(p.name for p in sessions.iterdir()) if sessions.exists() else [],
            "disks": sorted(p.name for p in cfg.disks_dir.iterdir()) if cfg.disks_dir.exists() else [],
            "fake_vmms": [str(p) for p in fake_vmms_of(cfg)]}


class Running:
    """A dispod served from a thread of this process, with clients for its two listeners."""

    def __init__(self, dispod: Dispod, lines: list[str]) -> None:
        self.dispod = dispod
        self.lines = lines
        self.uds = DispodClient(uds=dispod.paths.socket)

    @property
    def base(self) -> str:
        assert self.dispod.server is not None
        return self.dispod.server.base_url

    @property
    def token(self) -> str:
        return self.dispod.token

    def tcp(self, *, auth: bool = True) -> httpx.Client:
        """A raw HTTP client on TCP, with the bearer token or without."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def raw_uds(self) -> httpx.Client:
        return httpx.Client(base_url="http://dispod", transport=httpx.HTTPTransport(uds=str(self.dispod.paths.socket)),
                            timeout=30)

    def tcp_client(self) -> DispodClient:
        return DispodClient(base_url=self.base, token=self.token)


@contextlib.contextmanager
def serving(cfg: Config, *, listen: str = "127.0.0.1:0", max_sessions: int = 4, limits: Limits | None = None,
            machinery: Machinery | None = None, new_token: bool = False, cluster_secret: str = "") -> Iterator[Running]:
    lines: list[str] = []
    options = Options(listen=listen, max_sessions=max_sessions, limits=limits or Limits(),
                      machinery=machinery or fakes.machinery(), new_token=new_token, cluster_secret=cluster_secret)
    dispod = Dispod(cfg, options, lines.append)
    dispod.open()
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_box: list[asyncio.Event] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        loop_box.append(asyncio.get_running_loop())
        stop = asyncio.Event()
        stop_box.append(stop)
        await dispod.serve(stop)

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="dispod-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + SAFETY_S
    while not dispod.paths.url.exists():  # written once both listeners accept
        assert not failure, failure
        assert time.monotonic() < deadline, "dispod did not start"
        time.sleep(0.02)
    running = Running(dispod, lines)
    try:
        yield running
    finally:
        running.uds.close()
        if loop_box and stop_box:
            loop_box[0].call_soon_threadsafe(stop_box[0].set)
        thread.join(SAFETY_S)
        dispod.close()
        assert not thread.is_alive(), "dispod did not stop"
        assert not failure, failure


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return fakes.config(tmp_path)


@pytest.fixture
def svc(cfg: Config) -> Iterator[Running]:
    before = leftovers(cfg)
    with serving(cfg) as running:
        yield running
    assert leftovers(cfg) == before  # dispod's stop ended every session and removed all they made


def wait_state(client: DispodClient, sid: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + SAFETY_S
    while True:
        status = client.session(sid)
        if status["state"] == state:
            return status
        assert status["state"] != "ended" or state == "ended", status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def until_ended(client: DispodClient, sid: str) -> list[Event]:
    """One session's events until its `ended` event (what `dispo run` through dispod reads)."""
    events = list(client.events(session=sid))
    assert events and events[-1].kind is EventKind.ENDED, events
    return events


SLEEP = {"image": "minimal", "command": ["sleep", "600"]}


def spawn_dispod(root: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dispo.daemon.main", "--machinery", "tests.fakes:machinery",
                                 *extra], env=fakes.env(root), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=fakes.REPO)


def dispod_ready(cfg: Config, proc: subprocess.Popen[bytes], log: Path) -> DispodClient:
    deadline = time.monotonic() + SAFETY_S
    while (client := DispodClient.available(cfg)) is None:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return client


def end_dispod(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(SAFETY_S)


@pytest.fixture
def rt(cfg: Config) -> Iterator[Runtime]:
    viewers = StandaloneViewers()
    runtime = Runtime(cfg, machinery=fakes.machinery(), viewers=viewers)
    yield runtime
    assert runtime.shutdown("test over", timeout=30) == []
    viewers.close()


OWNER_SCRIPT = """
import sys, time
from pathlib import Path
from typing import Any
from dispo import config
from dispo.runtime import Runtime, build
from tests import fakes
cfg = config.load(Path(sys.argv[1]), env={})
rt = Runtime(cfg, machinery=fakes.machinery())
live = rt.start(build(cfg, command=["sleep", "600"]))
while live.state.value != "running":
    time.sleep(0.02)
print(live.id, flush=True)
time.sleep(600)
"""


def make_template(rt: Runtime, name: str = "minimal", kind: str = "auto") -> None:
    req, k = warm.build_request(rt.cfg, name, kind=kind)
    live = rt.start(req, steps=warm.template_steps(k, name))
    assert live.wait(30) and live.error is None, live.error
    assert live.end_reason == f"template {k.value}-{name} saved"


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispo")
    sub = p.add_subparsers()
    run.register(sub)
    (parser,) = [c for c in sub.choices.values() if c.prog.endswith(" run")]
    return parser


def mint(svc: Running, sid: str, scope: str) -> dict[str, Any]:
    """POST /v1/sessions/SID/tokens: a new token of `scope` for the session (web/viewers.py)."""
    with svc.raw_uds() as http:
        r = http.post(f"/v1/sessions/{sid}/tokens", json={"scope": scope})
    assert r.status_code == 201, r.text
    return dict(r.json())


def tokens(svc: Running, sid: str) -> list[dict[str, Any]]:
    """GET /v1/sessions/SID/tokens: the session's tokens as listed (ids and scopes, never the secrets)."""
    with svc.raw_uds() as http:
        r = http.get(f"/v1/sessions/{sid}/tokens")
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


# -- sessions driven over a WebSocket (the automation relay, tests/fakecdp.py's fake browser) ------------------
def start_session(svc: Running, **body: Any) -> dict[str, Any]:
    """POST /v1/sessions of the chromium profile (with `body`), once it runs."""
    created = svc.uds.create_session({"profile": "chromium", **body})
    wait_state(svc.uds, created["id"], "running")
    return dict(created)


async def ask(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    """Send `text`, and the text message that answers it (the fake browser echoes, or answers "open?")."""
    await ws.send_str(text)
    msg = await ws.receive(SAFETY_S)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return str(msg.data)


def run_async(coro: Any) -> Any:
    """A coroutine run to its end, within the safety bound."""
    return asyncio.run(asyncio.wait_for(coro, SAFETY_S))
