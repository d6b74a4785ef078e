"""dispod in a test world (tests/netns.py): started in the world's host namespace, stopped with SIGTERM; the
world kills it in any case when it ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dispo.client import DispodClient
from tests.netns import NetWorld


@dataclass
class Dispod:
    proc: subprocess.Popen[str]
    log: Path
    client: DispodClient
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_dispod(w: NetWorld, name: str = "dispod", *extra: str, env: dict[str, str] | None = None) -> Dispod:
    """dispod in the world's host namespace, on TCP and its unix socket; returns once its API answers."""
    log = w.root / f"{name}.log"
    port = _free_port()
    argv = ["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m", "dispo.daemon.main",
            "--listen", f"127.0.0.1:{port}", *extra]
    proc = w.spawn(argv, env=env or w.env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    client = wait_answering(w.state_dir / "dispod.sock", [proc], log, timeout=60)
    return Dispod(proc, log, client, port)


def wait_answering(sock: Path, procs: list[subprocess.Popen[str]], log: Path, timeout: float) -> DispodClient:
    """A client of the dispod (or gateway) on `sock` once its API answers; fails when one of `procs` (what it
    needs) exits or `timeout` passes, with its log."""
    deadline = time.monotonic() + timeout
    while True:
        if sock.exists():
            client = DispodClient(uds=sock)
            with contextlib.suppress(Exception):
                client.health()
                return client
            client.close()
        assert all(p.poll() is None for p in procs), f"dispod exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"dispod did not answer: {log.read_text()}"
        time.sleep(0.1)


def stop_dispod(d: Dispod) -> None:
    if d.proc.poll() is None:
        os.kill(d.proc.pid, signal.SIGTERM)  # nsenter exec()s python: this is dispod itself
        assert d.proc.wait(120) == 0, d.log.read_text()


def wait_state(d: Dispod, sid: str, state: str, timeout: float = 300) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        s = d.client.session(sid)
        if s["state"] == state:
            return s
        assert s["state"] != "ended", s
        assert time.monotonic() < deadline, s
        time.sleep(0.3)
