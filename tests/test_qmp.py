"""dispo's QMP client against a stand-in QEMU on a unix socket: what it reads from QEMU is capped while read (a
QEMU a guest took over may send anything), and events between a command and its answer are passed over."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from dispo.errors import VmmError
from dispo.vmm.qemu import QMP_MAX_LINE, Qmp

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'


def _serve(path: Path, answers: list[bytes]) -> threading.Thread:
    """Greets, then writes one of `answers` per command line it reads (qmp_capabilities first)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server, contextlib.suppress(OSError):
            conn.sendall(GREETING)
            commands = conn.makefile("rb")
            for answer in answers:
                if not commands.readline():
                    return
                conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_a_command_gets_its_answer_past_events(tmp_path: Path) -> None:
    t = _serve(tmp_path / "qmp.sock", [b'{"return": {}}\n',
                                       b'{"event": "RESUME"}\n{"return": {"status": "paused", "running": false}}\n'])
    q = Qmp(tmp_path / "qmp.sock", timeout=5)
    try:
        assert q.command("query-status")["status"] == "paused"
    finally:
        q.close()
    t.join(5)


def test_an_endless_message_is_refused_at_the_cap(tmp_path: Path) -> None:
    t = _serve(tmp_path / "qmp.sock", [b'{"return": {}}\n', b'{"return": "' + b"x" * (QMP_MAX_LINE * 2)])
    q = Qmp(tmp_path / "qmp.sock", timeout=5)
    try:
        with pytest.raises(VmmError, match="longer than"):
            q.command("query-status")
    finally:
        q.close()
    t.join(5)
