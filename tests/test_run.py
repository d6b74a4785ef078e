"""`dispo run` end to end on a real guest (QEMU, TCG here) inside namespaces the test builds.

The world (tests/netns.py): a "host" netns where dispo runs, with a NAT uplink into an "internet" netns
serving a page. Nothing here touches the machine's own network. After every test, an independent listing
(links, nftables, disks, journals and state files, QEMU processes) must equal the one taken before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.guests import listing, qemu_processes, tcp_banner, wait_ready
from tests.netns import DISPO, INTERNET, INTERNET_PORT, PAGE, NetWorld, dispo_links

pytestmark = [pytest.mark.root, pytest.mark.vm]

URL = f"http://{INTERNET}:{INTERNET_PORT}/index.txt"


def test_run_end_to_end(vm_world: NetWorld) -> None:
    w = vm_world
    before = listing(w)
    script = f'curl -sS --max-time 20 {URL} && echo "written by session one" > ~/note && printf "%s|" "$@"; exit 7'
    first = w.dispo("run", "--image", "minimal", "--", "sh", "-c", script, "sh", "a b", "c'd", '"$HOME"', "",
                    timeout=300)
    assert first.returncode == 7, first.stderr  # CMD's status is dispo's status
    assert first.stdout == PAGE + "a b|c'd|\"$HOME\"||", first.stdout
    assert "ready in" in first.stderr
    assert listing(w) == before

    second = w.dispo("run", "--", "sh", "-c", "test ! -e ~/note && id -un && hostname", timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    user, hostname = second.stdout.split()
    assert user == "user" and hostname.startswith("dispo-")
    assert listing(w) == before


def test_a_command_runs_through_the_agent_with_no_ssh_on_the_host(vm_world: NetWorld) -> None:
    """`dispo run -- CMD` without a terminal: ready when the guest's agent answers, the command through the
    agent; its stdout, stderr and status as over SSH, and no ssh process started on the host (an `ssh` first
    on PATH, which dispo finds ssh by, notes every start)."""
    w = vm_world
    shim = w.root / "ssh-shim"
    shim.mkdir()
    started = w.root / "ssh-started"
    (shim / "ssh").write_text(f'#!/bin/sh\necho "$*" >> {started}\nexec /usr/bin/ssh "$@"\n')
    (shim / "ssh").chmod(0o755)
    env = dict(w.env(), PATH=f"{shim}:{w.env()['PATH']}")
    before = listing(w)
    script = 'printf "out %s\\n" "$@"; echo "err $(id -un) $PWD" >&2; tr a-z A-Z; exit 9'
    p = subprocess.run(w.dispo_argv("run", "--image", "minimal", "--", "sh", "-c", script, "sh", "a b", "$HOME"),
                       env=env, input="from stdin\n", capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 9, p.stderr
    assert p.stdout == "out a b\nout $HOME\nFROM STDIN\n", p.stdout
    assert "err user /home/user\n" in p.stderr and "ready in" in p.stderr, p.stderr
    assert not started.exists(), started.read_text()
    # The same through SSH (`dispo ssh` on a live session): the same output and status.
    held = w.spawn(w.dispo_argv("run", "--", "sleep", "600"), env=env, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    (sid,) = wait_ready(w, [held], 1)
    assert not started.exists(), started.read_text()
    q = subprocess.run(w.dispo_argv("ssh", sid, "--", "sh", "-c", script, "sh", "a b", "$HOME"), env=env,
                       input="from stdin\n", capture_output=True, text=True, timeout=120, check=False)
    assert (q.returncode, q.stdout, q.stderr) == (9, p.stdout, "err user /home/user\n"), q.stderr
    assert started.exists()  # the shim sees ssh when it runs
    os.kill(held.pid, signal.SIGTERM)
    assert held.wait(60) == 128 + signal.SIGTERM
    assert listing(w) == before


def test_under_ip_netns_exec_it_works_or_fails_in_one_line(vm_world: NetWorld) -> None:
    """`ip netns exec` gives dispo a fresh /sys without the cgroup mounts: the VMM's limits cannot be set
    there. dispo must say so in one line (not "internal error") and leave nothing behind."""
    w = vm_world
    before = listing(w)
    p = subprocess.run(["ip", "netns", "exec", w.host, *DISPO, "run", "--image", "minimal", "--", "true"],
                       env=w.env(), capture_output=True, text=True, timeout=300, check=False,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        errors = [line for line in p.stderr.splitlines() if line.startswith("dispo: error: ")]
        assert len(errors) == 1, p.stderr
        assert "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert "cgroup" in errors[0] and "hint:" in errors[0], p.stderr
    assert listing(w) == before


def test_the_command_reads_the_callers_stdin(vm_world: NetWorld) -> None:
    w = vm_world
    p = subprocess.run(w.dispo_argv("run", "--", "sh", "-c", "tr a-z A-Z; exit 4"), env=w.env(), input="piped in\n",
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 4 and p.stdout == "PIPED IN\n", p.stderr


def test_profile_network_policy_reaches_the_guest(vm_world: NetWorld) -> None:
    """A profile's [network] table is the session's firewall: the same fetch works with internet = true and is
    refused with internet = false."""
    w = vm_world
    pdir = w.root / "profiles"
    pdir.mkdir()
    for name, internet in (("fetch-open", "true"), ("fetch-closed", "false")):
        (pdir / f"{name}.toml").write_text(
            f'image = "minimal"\nmemory_mib = 512\ncommand = ["curl", "-sS", "--max-time", "8"]\n'
            f'display = "none"\n[network]\ninternet = {internet}\n')
    w.config.write_text(f'profiles_dir = "{pdir}"\n' + w.config.read_text())
    before = listing(w)
    opened = w.dispo("run", "fetch-open", URL, timeout=300)
    assert opened.returncode == 0 and opened.stdout == PAGE, opened.stderr
    closed = w.dispo("run", "fetch-closed", URL, timeout=300)
    assert closed.returncode != 0 and closed.stdout == "", closed.stdout
    assert "ready in" in closed.stderr, closed.stderr  # the guest ran; the firewall refused the fetch
    assert listing(w) == before


def test_two_sessions_at_once_isolated_then_stopped(vm_world: NetWorld) -> None:
    w = vm_world
    before = listing(w)
    procs = [w.spawn(w.dispo_argv("run", "--name", name, "--", "sleep", "600"), env=w.env(),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("one", "two")]
    a, b = wait_ready(w, procs, 2)
    assert len(qemu_processes(w)) == 2  # the listing's probe sees this world's guests
    addr = {sid: json.loads((w.state_dir / "sessions" / sid / "ssh.json").read_text())["address"] for sid in (a, b)}
    name = {sid: json.loads((w.state_dir / "sessions" / sid / "state.json").read_text())["meta"]["name"]
            for sid in (a, b)}
    assert dispo_links(w.host) == {f"dsp-{a}", f"dsp-{b}"}
    ls = w.dispo("ls").stdout
    assert a in ls and b in ls and "one" in ls and "two" in ls
    for sid in (a, b):
        got = w.dispo("ssh", sid, "--", "curl", "-sS", "--max-time", "20", URL, timeout=60)
        assert got.returncode == 0 and got.stdout == PAGE, got.stderr
    # The probe works (a guest reaches its own sshd) and neither guest reaches the other's.
    assert tcp_banner(w, a, addr[a]) == "SSH-"
    assert tcp_banner(w, a, addr[b]) == ""
    assert tcp_banner(w, b, addr[a]) == ""

    stopped = w.dispo("stop", a, timeout=120)
    assert stopped.returncode == 0 and f"stopped {a}" in stopped.stdout, stopped.stderr
    by_sid = {sid: procs[0] if name[sid] == "one" else procs[1] for sid in (a, b)}
    assert by_sid[a].wait(60) == 128 + signal.SIGTERM
    os.kill(by_sid[b].pid, signal.SIGTERM)  # nsenter exec()s dispo: this is dispo itself
    assert by_sid[b].wait(60) == 128 + signal.SIGTERM
    assert listing(w) == before


def test_ssh_and_stop_need_a_live_session(vm_world: NetWorld) -> None:
    for cmd in (("ssh", "0123abcd", "--", "true"), ("stop", "0123abcd")):
        p = vm_world.dispo(*cmd)
        assert p.returncode == 1 and "no session 0123abcd" in p.stderr, p.stderr
    p = vm_world.dispo("ssh", "nothex!!")
    assert p.returncode == 1 and "invalid session id" in p.stderr


def test_interactive_shell_on_a_terminal(vm_world: NetWorld) -> None:
    """No CMD: a login shell on a pty (script(1) stands in for the user's terminal); its exit status is
    dispo's. Ctrl-C goes to the guest's shell, not to dispo."""
    w = vm_world
    before = listing(w)
    proc = subprocess.Popen(["script", "-qec", " ".join(w.dispo_argv("run")), "/dev/null"], env=w.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    deadline = time.monotonic() + 240
    while not list((w.state_dir / "sessions").glob("*/ssh.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    for keys in ("sleep 60\n", "\x03"):  # a Ctrl-C typed while a command runs in the guest
        time.sleep(2)
        proc.stdin.write(keys)
        proc.stdin.flush()
    time.sleep(2)
    out, _ = proc.communicate("echo answer-$((6*7)); tty; exit 5\n", timeout=120)
    assert proc.returncode == 5, out
    assert "answer-42" in out and "/dev/pts/" in out
    assert listing(w) == before


# Every step is killed after with the fakes (tests/test_runtime.py::test_kill_9_after_every_step_...); with a real
# guest, two stand for the rest: the last one before the VMM starts (every host object made, no QEMU yet) and
# the one after which the guest is up (QEMU must die with its owner).
REAL_KILL_STEPS = ("network", "guest.ready")


@pytest.mark.parametrize("step", REAL_KILL_STEPS)
def test_kill_9_after_a_step_then_the_next_command_reclaims(vm_world: NetWorld, step: str) -> None:
    """`dispo run` SIGKILLs itself right after STEP (DISPO_FAULT_KILL_AFTER): its QEMU dies with it, and the
    next dispo command of any kind (here `dispo image ls`) undoes the rest from the journal."""
    w = vm_world
    before = listing(w)
    env = {**w.env(), "DISPO_FAULT_KILL_AFTER": step}
    p = subprocess.run(w.dispo_argv("run", "--image", "minimal", "--", "sleep", "600"), env=env, timeout=300,
                       capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    assert p.returncode == -signal.SIGKILL, p.stderr
    deadline = time.monotonic() + 30
    while qemu_processes(w):
        assert time.monotonic() < deadline, qemu_processes(w)
        time.sleep(0.2)
    nxt = w.dispo("image", "ls")  # any command that acts (not an observer such as ls or net ls)
    assert nxt.returncode == 0 and "reclaimed 1 session(s) whose owner died" in nxt.stderr, nxt.stderr
    assert listing(w) == before
