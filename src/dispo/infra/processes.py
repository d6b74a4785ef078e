"""Child processes a session owns (VMMs, proxies): identity that survives pid reuse, and stopping them.

A process is recorded in the journal as (pid, starttime); `starttime` is field 22 of /proc/PID/stat, so
`dispo gc` never kills an unrelated process that happens to reuse the pid of a dead session's VMM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dispo.errors import DispoError, SpawnFailed
from dispo.infra.proc import minimal_env
from dispo.infra.undo import undoer

if TYPE_CHECKING:  # the journal imports the undo registry, which imports this module
    from dispo.infra.journal import Entry, Journal

# The gate: the child is a shell that waits for one line on a pipe and then execs the real program with the
# same pid. dispo writes that line only after the journal holds (pid, starttime); if dispo dies first, the
# pipe closes, `read` fails and the program never runs. By default the pipe is the child's stdin, which
# becomes /dev/null; with keep_stdin the pipe is another descriptor and the program keeps the caller's stdin
# (a terminal for an interactive guest shell).
GATE_EOF_EXIT = 97
# Children die with the thread that spawned them (prctl PR_SET_PDEATHSIG through util-linux's setpriv, kept
# across exec): a session's VMM and helpers never outlive a `dispo run` or dispod killed with -9. What they
# leave on the host (tap, rules, lease, disk) is then reclaimed from the journal by the next dispod or dispo.
SETPRIV = "/usr/bin/setpriv"
_GATE = f'read -r _ || exit {GATE_EOF_EXIT}; exec "$0" "$@" </dev/null'
# The shell reads its line one byte at a time, so with `stdin_pipe` what follows it is the program's.
_GATE_PIPE = f'read -r _ || exit {GATE_EOF_EXIT}; exec "$0" "$@"'
# bash, not sh: dash takes only one-digit descriptors in a redirection, and the pipe's number is whatever was
# free in the caller (10 or more in dispod, or in a CLI with many files open).
_GATE_FD = f'fd=$1; shift; read -r _ <&"$fd" || exit {GATE_EOF_EXIT}; eval "exec $fd<&-"; exec "$@"'


@dataclass(frozen=True)
class Spawned:
    proc: subprocess.Popen[bytes]
    starttime: str
    entry: Entry
    others: tuple[Entry, ...] = ()  # what `also` recorded, in its order


def spawn_recorded(journal: Journal, argv: Sequence[str | Path], *, what: str, stdout: IO[bytes] | int | None,
                   cwd: Path | None = None, on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
                   env: Mapping[str, str] | None = None, stderr: IO[bytes] | int | None = subprocess.STDOUT,
                   keep_stdin: bool = False, stdin_pipe: bool = False, new_session: bool = True,
                   die_with_parent: bool = True,
                   setpriv: Sequence[str] = (), pass_fds: Sequence[int] = (), outer: Sequence[str] = (),
                   also: Sequence[tuple[str, Mapping[str, str]]] = (), wait_tied: bool = True,
                   before_go: Callable[[], None] | None = None, **record: str) -> Spawned:
    """Start a child (a VMM, an ssh tunnel, a guest command) whose pid is journaled before its program runs.

    Popen, not proc.run(): its stdout goes to a log. A new session keeps the terminal's Ctrl-C away from it:
    dispo stops it itself, in order. `on_spawn` gets the child before it is recorded, so a caller can still
    reap it if recording fails (the gate then exits with GATE_EOF_EXIT without running the program).
    `stdout`/`stderr` None inherit the caller's; `keep_stdin` keeps its stdin; `stdin_pipe` gives it a pipe
    from the caller (`proc.stdin`, which then carries the gate's line first); `new_session=False` keeps
    the caller's terminal (an interactive shell). `die_with_parent` (the default) SIGKILLs the child when the
    calling thread dies: call this from the thread that owns the child for its whole life. `setpriv` adds
    options of util-linux's setpriv (drop to a uid, no capabilities); `pass_fds` are handed to the program;
    `outer` is a wrapper that runs with root's privileges before those are dropped (and must exec its argv,
    keeping the pid). `also`: journal entries (kind, args) for objects the program will make, recorded in the
    same write (one fsync) as the process, before it runs; `before_go` then makes what the program expects to find
    (a failure there and the program never runs). `wait_tied=False`: the caller waits itself for
    something only the program makes (a socket it binds), which comes after the tie (_wait_until_tied)."""
    r, w = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    went = False  # the gate got its line
    try:
        words = [str(a) for a in argv]
        if die_with_parent or setpriv:
            if not os.access(SETPRIV, os.X_OK):
                raise SpawnFailed(f"{SETPRIV} is missing: dispo cannot tie {what} to its owner",
                                  hint="install util-linux (apt-get install util-linux)")
            pdeath = ["--pdeathsig", "KILL"] if die_with_parent else []
            words = [SETPRIV, *pdeath, *setpriv, "--", *words]
        words = [*outer, *words]
        gate_stdin: int | None = r
        if stdin_pipe:
            gate, gate_stdin = ["/bin/sh", "-c", _GATE_PIPE, *words], subprocess.PIPE
        elif keep_stdin:
            gate, gate_stdin = ["/bin/bash", "-c", _GATE_FD, "gate", str(r), *words], None
        else:
            gate = ["/bin/sh", "-c", _GATE, *words]
        proc = subprocess.Popen(gate, stdin=gate_stdin, stdout=stdout, stderr=stderr,
                                env=dict(env) if env is not None else minimal_env(), cwd=cwd,
                                start_new_session=new_session,
                                pass_fds=(*((r,) if keep_stdin else ()), *pass_fds))
        if on_spawn is not None:
            on_spawn(proc)
        os.close(r)
        r = -1
        start = starttime(proc.pid)
        if start is None:
            proc.wait()
            raise SpawnFailed(f"{what} exited at once (status {proc.returncode})")
        *others, entry = journal.record_all(
            [*also, ("process", {"pid": str(proc.pid), "starttime": start, "what": what, **record})])
        if before_go is not None:
            before_go()
        if stdin_pipe:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")  # into an empty pipe: never blocks
            proc.stdin.flush()
        else:
            os.write(w, b"go\n")
        went = True
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)
        if stdin_pipe and not went and proc is not None and proc.stdin is not None:
            proc.stdin.close()  # the gate's end of file: it exits without running the program
    if die_with_parent and wait_tied:
        _wait_until_tied(proc.pid, str(argv[0]))
    return Spawned(proc, start, entry, tuple(others))


def _wait_until_tied(pid: int, program: str, timeout: float = 2.0) -> None:
    """Wait until the child runs `program` itself, past setpriv: only then is its parent-death signal set. A
    caller that died between the gate's "go" and setpriv's prctl would otherwise leave the program running
    with no one to kill it (the kernel sends the signal only to children that asked for it before the parent
    died). Bounded: a program that is a script, or that exits at once, is not waited for longer."""
    found = shutil.which(program)
    if found is None:
        return
    want = os.path.realpath(found)
    try:
        with open(want, "rb") as f:
            if f.read(2) == b"#!":
                return  # a script runs as its interpreter: there is no exe of its own to wait for
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/exe") == want:
                return
        except OSError:
            return  # gone (or a zombie): nothing left to tie
        time.sleep(0.001)


def starttime(pid: int) -> str | None:
    """Start time of pid in clock ticks since boot, or None if there is no such process."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def is_same_process(pid: int, start: str) -> bool:
    now = starttime(pid)
    if now is None:
        return False
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
    return now == start and state != "Z"


def wait_gone(pid: int, start: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
        if not is_same_process(pid, start):
            return True
        time.sleep(0.02)
    return not is_same_process(pid, start)


def terminate(pid: int, start: str, *, term_timeout: float = 5.0, kill_timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, each with a deadline; raises if the process is still there after both."""
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        if not is_same_process(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, start, timeout):
            return
    raise DispoError(f"process {pid} survived SIGKILL", hint="check for a process stuck in the kernel (D state)")


def exit_status(proc: subprocess.Popen[bytes] | None, timeout: float | None = None) -> int | None:
    """The child's exit status once it has exited (waiting up to `timeout`), else None."""
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@undoer("process")
def undo_process(args: Mapping[str, str]) -> None:
    terminate(int(args["pid"]), args["starttime"], term_timeout=float(args.get("term_timeout", "3")))
