"""processes.spawn_recorded: a child never outlives its owner, even one killed the moment the spawn returns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The owner: spawns a long sleeper through the gate, writes its pid, and SIGKILLs itself at once; the window
# between the gate's "go" and setpriv's prctl(PR_SET_PDEATHSIG) is the race under test.
_OWNER = """
import os, signal, sys
from pathlib import Path
from dispo.infra.journal import Journal
from dispo.names import new_session_id
from dispo.infra import processes
j = Journal.create(Path(sys.argv[1]), new_session_id(), {"purpose": "test"})
s = processes.spawn_recorded(j, [sys.executable, "-c", "import time; time.sleep(600)"], what="sleeper",
                             stdout=None)
Path(sys.argv[2]).write_text(str(s.proc.pid))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_child_dies_with_an_owner_killed_right_after_the_spawn(tmp_path: Path) -> None:
    survivors = []
    for i in range(10):  # the race is narrow: each round is a fresh owner and child
        pidfile = tmp_path / f"pid-{i}"
        owner = subprocess.run([sys.executable, "-c", _OWNER, str(tmp_path / f"state-{i}"), str(pidfile)],
                               capture_output=True, text=True, timeout=60, check=False)
        assert owner.returncode == -signal.SIGKILL, owner.stderr
        pid = int(pidfile.read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            survivors.append(pid)
            os.kill(pid, signal.SIGKILL)
    assert survivors == []


def test_a_gate_on_a_high_descriptor_still_runs_its_program(tmp_path: Path) -> None:
    """keep_stdin: the gate's pipe is another descriptor, whatever number was free (dash took only 0-9)."""
    from dispo.infra import processes
    from dispo.infra.journal import Journal
    from dispo.names import new_session_id

    j = Journal.create(tmp_path, new_session_id(), {"purpose": "test"})
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(12)]  # the pipe lands above fd 9
    try:
        out = tmp_path / "out"
        with out.open("wb") as f:
            s = processes.spawn_recorded(j, ["echo", "ran"], what="echo", stdout=f, keep_stdin=True,
                                         new_session=True)
            assert s.proc.wait(30) == 0
        assert out.read_text() == "ran\n"
    finally:
        for fd in held:
            os.close(fd)
        j.unwind()
