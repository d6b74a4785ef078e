"""dispo's QMP client against a stand-in QEMU on a unix socket: what it reads from QEMU is capped while read (a
QEMU a guest took over may send anything), and events between a command and its answer are passed over."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispo.errors import VmmError
from dispo.vmm.qemu import QMP_MAX_LINE, Qmp
from tests import fakes

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'


def test_a_command_gets_its_answer_past_events(tmp_path: Path) -> None:
    # qmp_capabilities first, then query-status, whose answer comes after an event
    answers = [b'{"return": {}}\n', b'{"event": "RESUME"}\n{"return": {"status": "paused", "running": false}}\n']
    t = fakes.control_socket(tmp_path / "qmp.sock", answers, greeting=GREETING)
    q = Qmp(tmp_path / "qmp.sock", timeout=5)
    try:
        assert q.command("query-status")["status"] == "paused"
    finally:
        q.close()
    t.join(5)


def test_an_endless_message_is_refused_at_the_cap(tmp_path: Path) -> None:
    answers = [b'{"return": {}}\n', b'{"return": "' + b"x" * (QMP_MAX_LINE * 2)]
    t = fakes.control_socket(tmp_path / "qmp.sock", answers, greeting=GREETING)
    q = Qmp(tmp_path / "qmp.sock", timeout=5)
    try:
        with pytest.raises(VmmError, match="longer than"):
            q.command("query-status")
    finally:
        q.close()
    t.join(5)
