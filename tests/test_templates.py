"""Warm starts end to end (QEMU/TCG): a template of `minimal`, two clones restored from it at once, each with
its own identity, reaching the test "internet" through NAT and not each other; nothing left after them. The
chromium profile's template and its clones are tests/test_browser.py's web viewer test (its two sessions are
clones of it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dispodworld import start_dispod, stop_dispod
from tests.guests import (
    listing,
    state_listing,
    tcp_banner,
    wait_ready,
)
from tests.netns import INTERNET, INTERNET_PORT, PAGE, NetWorld, dispo_links

pytestmark = [pytest.mark.root, pytest.mark.vm]

URL = f"http://{INTERNET}:{INTERNET_PORT}/index.txt"

# What a clone says about itself, one line each: urandom, the host key sshd presents, hostname, the page. The
# command runs once the agent answered: sshd may still be re-executing on its new key, so the key is asked again.
PROBE = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
         "for i in $(seq 100); do k=$(ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | cut -d' ' -f3); "
         "[ -n \"$k\" ] && break; sleep 0.1; done; echo \"$k\"; hostname; "
         f"curl -sS --max-time 20 {URL}")


def _build(w: NetWorld, *args: str) -> subprocess.CompletedProcess[str]:
    p = w.dispo("template", "build", *args, timeout=900)
    assert p.returncode == 0, p.stderr
    return p


def test_two_clones_of_a_minimal_template_each_have_their_own_identity(vm_world: NetWorld) -> None:
    w = vm_world
    before = listing(w)
    built = _build(w, "minimal")
    assert "template image-minimal" in built.stdout, built.stdout
    assert listing(w) == before  # the building session is gone; only the template stays (in the workspace)
    ls = w.dispo("template", "ls")
    assert "minimal" in ls.stdout and "current" in ls.stdout, ls.stdout

    procs = [w.spawn(w.dispo_argv("run", "--name", name, "--", "sh", "-c", PROBE + "; sleep 600"), env=w.env(),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("one", "two")]
    a, b = wait_ready(w, procs, 2)
    addr = {sid: json.loads((w.state_dir / "sessions" / sid / "ssh.json").read_text())["address"] for sid in (a, b)}
    assert addr[a] != addr[b]
    assert dispo_links(w.host) == {f"dsp-{a}", f"dsp-{b}"}
    # Neither clone reaches the other (each its own tap and rules), while each reaches its own sshd.
    assert tcp_banner(w, a, addr[a]) == "SSH-"
    assert tcp_banner(w, a, addr[b]) == ""
    assert tcp_banner(w, b, addr[a]) == ""
    # Their RAM: one sealed copy of the template's, mapped privately (copy on write) by both QEMUs, which the
    # template's file never is; the file is what it was sealed as after both ran and wrote their memory.
    ram = w.workspace / "templates" / "image-minimal" / "ram.qemu"
    maps = [_ram_mappings(_vmm_pid(sid)) for sid in (a, b)]
    assert all(m and {perms for perms, _ in m} == {"rw-p"} for m in maps), maps
    assert {inode for m in maps for _, inode in m} == {maps[0][0][1]}  # the same pages under both
    assert not any("ram.qemu" in line for sid in (a, b) for line in _maps(_vmm_pid(sid)))
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert "restoring from template image-minimal" in err, err
        outs.append(out.splitlines())
    (rand1, key1, host1, page1, *_), (rand2, key2, host2, page2, *_) = outs
    assert len(rand1) == 64 and rand1 != rand2       # the RNG was reseeded differently in each clone
    assert key1 and key2 and key1 != key2             # new SSH host keys
    assert {host1, host2} == {f"dispo-{a}", f"dispo-{b}"}  # each its own hostname
    assert page1 + "\n" == PAGE and page2 + "\n" == PAGE  # the test internet through NAT
    assert listing(w) == before
    sealed = json.loads((ram.parent / "template.json").read_text())["files"]["ram.qemu"]["sha256"]
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == sealed


def _vmm_pid(sid: str) -> int:
    """The QEMU of session sid (its environment names the session)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if f"DISPO_SESSION={sid}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no VMM of session {sid}")


def _maps(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/maps").read_text().splitlines()


def _ram_mappings(pid: int) -> list[tuple[str, str]]:
    """(permissions, inode) of each mapping of the template's shared RAM in process pid."""
    return [(f[1], f[4]) for f in (line.split() for line in _maps(pid)) if len(f) > 5 and
            f[5].startswith("/memfd:dispo-ram-")]


def test_cold_forces_a_boot_and_a_changed_image_is_refused(vm_world: NetWorld) -> None:
    w = vm_world
    _build(w, "minimal")
    cold = w.dispo("run", "--cold", "--", "true", timeout=300)
    assert cold.returncode == 0 and "booting cold (--cold)" in cold.stderr, cold.stderr
    # The image is replaced (same recipe, a new import): the template no longer belongs to it.
    rebuilt = w.dispo("image", "build", "minimal", "--force", "--quiet", timeout=900)
    assert rebuilt.returncode == 0, rebuilt.stderr
    warm = w.dispo("run", "--warm", "--", "true", timeout=300)
    assert warm.returncode == 1, warm.stderr
    assert warm.stderr.count("\n") == 1, warm.stderr
    assert "template image-minimal is stale: its image 'minimal' changed" in warm.stderr
    auto = w.dispo("run", "--", "true", timeout=300)
    assert auto.returncode == 0 and "booting cold: template image-minimal is stale" in auto.stderr, auto.stderr
    assert "stale" in w.dispo("template", "ls").stdout


def test_dispods_warm_pool_hands_out_each_restored_clone_once(vm_world: NetWorld) -> None:
    """dispod keeps one clone of the minimal template restored and paused ([service] pool); `dispo run` through
    dispod is handed it (with its own identity: its hostname is its session's), and a new one takes its place.
    Stopping dispod drains the pool: nothing is left."""
    w = vm_world
    _build(w, "minimal")
    w.config.write_text('[service]\npool = "minimal=1"\n' + w.config.read_text())
    before = state_listing(w)
    d = start_dispod(w)
    try:
        def waiting() -> list[str]:
            return [s.parent.name for s in (w.state_dir / "sessions").glob("*/state.json")
                    if d.client.pool()["slots"][0]["ready"] == 1]

        deadline = time.monotonic() + 300
        while not (first := waiting()):
            assert time.monotonic() < deadline, d.log.read_text()
            time.sleep(0.5)
        assert d.client.sessions() == []  # a waiting clone is nobody's session
        run = w.dispo("run", "--", "sh", "-c", f"hostname; curl -sS --max-time 20 {URL}", timeout=300)
        assert run.returncode == 0, run.stderr
        assert "handed a guest from the warm pool" in run.stderr, run.stderr
        hostname, page = run.stdout.split("\n", 1)
        assert hostname == f"dispo-{first[0]}" and page == PAGE, run.stdout
        deadline = time.monotonic() + 300
        while (again := waiting()) in ([], first):
            assert time.monotonic() < deadline, d.log.read_text()
            time.sleep(0.5)
        assert first[0] not in again  # the one handed out is gone; a new clone waits
    finally:
        stop_dispod(d)
    assert state_listing(w) == before
