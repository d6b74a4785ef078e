"""The QEMU backend: its command line, the accelerator probe, and real microVMs started, stopped and gc'd."""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo import ssh
from dispo.config import StorageBackend
from dispo.errors import Conflict, InvalidInput, NotFound
from dispo.infra import journal as journal_mod
from dispo.infra.journal import Journal
from dispo.infra.processes import is_same_process
from dispo.names import new_session_id
from dispo.storage.images import Image
from dispo.vmm import accel, qemu, registry, sandbox
from dispo.vmm.accel import Accel
from dispo.vmm.base import MachineSpec, NetAttachment, Vmm
from tests.tiers import tier

SID = "0badc0de"


def spec(tmp_path: Path, **kw: object) -> MachineSpec:
    base: dict[str, object] = dict(session_id=SID, kernel=tmp_path / "vmlinuz", rootfs=tmp_path / "disk.ext4",
                                   workdir=tmp_path, cmdline=("console=ttyS0", "root=/dev/vda"),
                                   initrd=tmp_path / "initrd.img")
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def test_argv_is_a_microvm_on_the_session_tap(tmp_path: Path) -> None:
    vmm: Vmm = qemu.QemuVmm(spec(tmp_path, nets=(NetAttachment("dsp-0badc0de", "06:00:ac:14:00:02"),),
                                 memory_mib=768, vcpus=2), Accel.TCG)  # mypy checks it is a base.Vmm
    assert isinstance(vmm, qemu.QemuVmm)
    argv = vmm.argv(FDS)
    joined = " ".join(argv)
    assert argv[argv.index("-M") + 1].startswith("microvm")
    assert "tap,id=n0,fd=15" in argv
    assert "virtio-net-device,netdev=n0,mac=06:00:ac:14:00:02" in argv
    assert "virtio-blk-device,drive=root" in argv and "virtio-rng-device,rng=rng0" in argv
    assert argv[argv.index("-m") + 1] == "768" and argv[argv.index("-smp") + 1] == "2"
    assert f"dispo-{SID}" in joined and "stdio,id=con0,signal=off" in argv  # the console: a capped pipe
    assert argv[argv.index("-initrd") + 1] == "/proc/self/fd/11"
    assert "-no-reboot" in argv and "-sandbox" in argv


FDS = qemu.LaunchFds(kernel=10, initrd=11, disk_rw=12, disk_ro=13, qmp=14, agent=16, taps=(15,))


def test_every_guest_has_the_agent_port_and_a_restore_reads_its_state_from_a_descriptor(tmp_path: Path) -> None:
    """The agent's virtio-serial port is in every guest's machine (a template and its clones must have the same
    devices); a restore adds `-incoming fd:N` on the template's state, opened read-only by dispo."""
    vmm = qemu.QemuVmm(spec(tmp_path, nets=(NetAttachment("dsp-0badc0de", "06:00:ac:14:00:02"),)), Accel.TCG)
    argv = vmm.argv(FDS)
    assert "socket,id=agent,fd=16,server=on,wait=off" in argv
    assert "virtserialport,chardev=agent,name=dispo.agent,nr=1" in argv and "-incoming" not in argv
    restored = vmm.argv(dataclasses.replace(FDS, incoming=17))
    assert restored[restored.index("-incoming") + 1] == "fd:17"
    assert [a for a in restored if a not in ("-incoming", "fd:17")] == argv  # the same machine otherwise
    assert 17 in dataclasses.replace(FDS, incoming=17).all() and 16 in FDS.all()


def test_a_template_guest_shares_its_ram_and_a_clone_maps_it_privately(tmp_path: Path) -> None:
    """A guest to be saved has its RAM in dispo's memfd, shared (the save copies it); a clone maps the same kind
    of descriptor privately (copy on write); both leave the RAM out of the migration stream."""
    vmm = qemu.QemuVmm(spec(tmp_path, memory_mib=512, extra={"template": "1"},
                            nets=(NetAttachment("dsp-0badc0de", "06:00:ac:14:00:02"),)), Accel.TCG)
    assert vmm.saveable and not qemu.QemuVmm(spec(tmp_path), Accel.TCG).saveable
    building = vmm.argv(dataclasses.replace(FDS, ram=18))
    assert "memory-backend-file,id=ram,size=512M,mem-path=/proc/self/fd/18,share=on" in building
    assert "memory-backend=ram" in building and "-incoming" not in building
    clone = vmm.argv(dataclasses.replace(FDS, ram=18, incoming=17))
    assert "memory-backend-file,id=ram,size=512M,mem-path=/proc/self/fd/18,share=off" in clone
    # x-ignore-shared is set over QMP before the migration starts (QEMU 7.2 has no -global for it)
    assert clone[clone.index("-incoming") + 1] == "defer" and 18 in dataclasses.replace(FDS, ram=18).all()
    assert "memory-backend=ram" not in vmm.argv(FDS)  # any other guest: QEMU's own anonymous RAM


def _template_ram(tmp_path: Path, size: int) -> Path:
    ram = tmp_path / "ram.qemu"
    with open(ram, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(b"guest" * 1000)
        f.seek(size - 4096)
        f.write(b"\xff" * 4096)
    ram.chmod(0o400)
    return ram


def _holder(fd: int) -> subprocess.Popen[bytes]:
    """A process named like a clone's QEMU (dispo-<session>) that holds fd, as a clone's QEMU holds its RAM."""
    code = ("import sys, time; open('/proc/self/comm', 'w').write('dispo-holder'); print('ok', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ok\n"
    return p


def test_clones_share_one_sealed_copy_of_the_template_ram_and_never_write_the_file(tmp_path: Path) -> None:
    size = 4 << 20
    ram = _template_ram(tmp_path, size)
    before = hashlib.sha256(ram.read_bytes()).hexdigest()
    fd = qemu.shared_ram(ram, size)
    holder = _holder(fd)
    try:
        assert os.pread(fd, size, 0) == ram.read_bytes()
        # Sealed: no write, no resize, no shared writable mapping, whoever holds it.
        for attempt in (lambda: os.pwrite(fd, b"x", 0), lambda: os.ftruncate(fd, size * 2),
                        lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)):
            with pytest.raises(OSError):
                attempt()
        # A private mapping is writable, and what is written there stays there (copy on write).
        with open(f"/proc/self/fd/{fd}", "r+b") as f:
            private = mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            private[0:5] = b"clone"
            assert private[0:5] == b"clone" and os.pread(fd, 5, 0) == b"\0" * 5
            private.close()
        # The next clone gets the same pages: the memfd the live "clone" holds, not a copy.
        again = qemu.shared_ram(ram, size)
        assert os.fstat(again).st_ino == os.fstat(fd).st_ino
        os.close(again)
    finally:
        holder.kill()
        holder.wait()
        os.close(fd)
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == before


def test_a_memfd_dispo_did_not_seal_is_never_taken_for_the_template_ram(tmp_path: Path) -> None:
    """A QEMU a guest took over could hold a memfd of the same name with other content: it is not sealed by
    dispo (or not root's), so the next clone gets a fresh copy of the file instead."""
    size = 4 << 20
    ram = _template_ram(tmp_path, size)
    fake = os.memfd_create(qemu._ram_name(ram), os.MFD_CLOEXEC)
    os.ftruncate(fake, size)
    os.pwrite(fake, b"evil", 0)
    holder = _holder(fake)
    try:
        fd = qemu.shared_ram(ram, size)
        assert os.fstat(fd).st_ino != os.fstat(fake).st_ino and os.pread(fd, 5, 4096) == b"guest"
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()
        os.close(fake)


def test_qemu_gets_descriptors_not_paths(tmp_path: Path) -> None:
    """Every host file QEMU uses is an open descriptor from dispo: a path with a comma (or anything else)
    cannot add QEMU options, and QEMU, running as the session's own uid, opens no host path of its own."""
    evil = tmp_path / "ws,readonly=off,file=,etc"
    vmm = qemu.QemuVmm(spec(evil, rootfs=evil / "disk.ext4", nets=(NetAttachment("dsp-0badc0de", "06:00:0:0:0:2"),)),
                       Accel.TCG)
    argv = vmm.argv(FDS)
    assert not any(str(evil) in a for a in argv), argv
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith("id=root,file=/dev/fdset/1,format=raw,")
    assert "werror=report" in drive and "rerror=report" in drive  # a full disk is an I/O error, not a pause
    assert "fd=12,set=1" in argv and "fd=13,set=1" in argv and "tap,id=n0,fd=15" in argv
    assert argv[argv.index("-kernel") + 1] == "/proc/self/fd/10" and "socket,id=qmp,fd=14,server=on,wait=off" in argv


def test_tsc_khz_only_under_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "host_tsc_khz", lambda: 2596120)
    tcg = qemu.QemuVmm(spec(tmp_path), Accel.TCG)
    kvm = qemu.QemuVmm(spec(tmp_path), Accel.KVM)
    assert "tsc_early_khz=2596120" in tcg.cmdline()
    assert not any(a.startswith("tsc_early_khz") for a in kvm.cmdline())
    no_net = dataclasses.replace(FDS, taps=())
    assert kvm.argv(no_net)[kvm.argv(no_net).index("-cpu") + 1] == "host"
    given = qemu.QemuVmm(spec(tmp_path, cmdline=("tsc_early_khz=1000",)), Accel.TCG)
    assert given.cmdline() == ("tsc_early_khz=1000",)


def test_host_tsc_khz_sources(tmp_path: Path) -> None:
    sysfs, cpuinfo = tmp_path / "tsc_freq_khz", tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2596.120\n\nprocessor\t: 1\ncpu MHz\t: 1.0\n")
    assert accel.host_tsc_khz(sysfs, cpuinfo) == 2596120
    sysfs.write_text("3000000\n")
    assert accel.host_tsc_khz(sysfs, cpuinfo) == 3000000
    assert accel.host_tsc_khz(tmp_path / "none", tmp_path / "none") is None
    assert accel.host_tsc_khz() is not None  # this host has an answer one way or the other


def test_accel_probe_runs_once_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_probe(kernel: Path, qemu: str = "", timeout: float = 0) -> bool:
        calls.append(kernel)
        return False

    monkeypatch.delenv("DISPO_QEMU_ACCEL", raising=False)
    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    monkeypatch.setattr(accel, "qemu_version", lambda qemu="": "QEMU emulator version 7.2.22")
    monkeypatch.setattr(accel, "_memo", {})
    cache = tmp_path / "accel.json"
    assert accel.choose(tmp_path / "k", cache_file=cache) is Accel.TCG
    assert accel.choose(tmp_path / "k", cache_file=cache) is Accel.TCG
    assert len(calls) == 1 and cache.is_file()
    monkeypatch.setattr(accel, "_memo", {})  # a new process: the file answers
    assert accel.choose(tmp_path / "k", cache_file=cache) is Accel.TCG and len(calls) == 1
    monkeypatch.setattr(accel, "qemu_version", lambda qemu="": "QEMU emulator version 9.0")
    monkeypatch.setattr(accel, "_memo", {})  # another QEMU: probe again
    accel.choose(tmp_path / "k", cache_file=cache)
    assert len(calls) == 2
    monkeypatch.setenv("DISPO_QEMU_ACCEL", "kvm")
    assert accel.choose(tmp_path / "k", cache_file=cache) is Accel.KVM and len(calls) == 2


def test_missing_kernel_is_named(tmp_path: Path) -> None:
    vmm = qemu.QemuVmm(spec(tmp_path), Accel.TCG)
    with pytest.raises(NotFound, match=r"kernel file .*vmlinuz does not exist"):
        vmm.check()


def test_remote_command_keeps_arguments_intact() -> None:
    args = ["printf", "%s|", "a b", "c'd", 'e"f', "$HOME", "*", "", "x\ny"]
    out = subprocess.run(["sh", "-c", ssh.remote_command(args)], capture_output=True, text=True, check=True).stdout
    assert out == "a b|c'd|e\"f|$HOME|*||x\ny|"


def _image(**kw: object) -> Image:
    base: dict[str, object] = dict(name="x", path=Path("/nonexistent"), size=1, sha256="0", storage=StorageBackend.COPY,
                                   created=0.0, source="", kernel="vmlinuz", vmms=("qemu",))
    base.update(kw)
    return Image(**base)  # type: ignore[arg-type]


def test_backend_choice() -> None:
    assert registry.choose_backend(None, _image()).value == "qemu"
    assert registry.choose_backend("auto", _image(vmms=())).value == "qemu"
    with pytest.raises(Conflict, match="not built for firecracker"):
        registry.choose_backend("firecracker", _image())
    with pytest.raises(InvalidInput, match="unknown backend"):
        registry.choose_backend("bhyve", _image())


# -- real guests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
@tier("vm")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cached minimal build (built on first use; shared with the other VM tests)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: building and booting images")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    from dispo.imagebuild import build_product, recipes
    from tests.worlds import make_config

    state = tmp_path_factory.mktemp("build-state")
    yield build_product(make_config(Path("/nonexistent"), state), recipes.MINIMAL, quiet=True).path


@pytest.fixture
@tier("root")
def vm_journal(tmp_path: Path) -> Iterator[Journal]:
    # Its own session id: the VM tests run in parallel (xdist), and the id names the VMM's cgroups.
    j = Journal.create(tmp_path / "state", new_session_id(), {"purpose": "test"})
    yield j
    if j._lock_fd is not None:
        j.unwind()


def _guest_spec(product: Path, j: Journal, tmp_path: Path, *extra: str) -> MachineSpec:
    disk = tmp_path / "disk.ext4"
    subprocess.run(["cp", "--sparse=always", product / "rootfs.ext4", disk], check=True)
    return MachineSpec(session_id=j.session_id, kernel=product / "vmlinuz", initrd=product / "initrd.img", rootfs=disk,
                       workdir=j.path, cmdline=("console=ttyS0", "root=/dev/vda", "rw", "panic=-1", *extra))


def _wait_console(vmm: qemu.QemuVmm, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in vmm.spec.console_log.read_text(errors="replace"):
        assert vmm.running(), vmm.console_tail()
        assert time.monotonic() < deadline, f"no {text!r} on the console: {vmm.console_tail()}"
        time.sleep(0.1)


@pytest.mark.root
@pytest.mark.vm
def test_boot_then_power_off(product: Path, vm_journal: Journal, tmp_path: Path) -> None:
    vmm = qemu.create(_guest_spec(product, vm_journal, tmp_path, "init=/usr/lib/dispo/init"))
    vmm.start(vm_journal)
    pid = vmm.pid
    assert pid is not None
    entry = next(e for e in vm_journal.entries if e.kind == "process")
    assert entry.args["pid"] == str(pid) and is_same_process(pid, entry.args["starttime"])
    assert Path(f"/proc/{pid}/comm").read_text().strip() == f"dispo-{vm_journal.session_id}"
    # Not root: the session's own uid and gid, no capability at all, no way to gain one.
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    uid = int(status["Uid"].split()[0])
    assert uid == vmm.uid >= sandbox.UID_BASE and set(status["Uid"].split()) == {str(uid)}
    assert set(status["Gid"].split()) == {str(uid)} and status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    # Its own mount namespace: the host's data (here this test's directory under /tmp) is not there.
    assert os.path.isdir(tmp_path) and not os.path.exists(f"/proc/{pid}/root{tmp_path}")
    assert os.listdir(f"/proc/{pid}/root/var") == [] and os.path.isdir(f"/proc/{pid}/root/usr/bin")
    # In cgroups of its own, with the session's limits.
    assert vmm.cgroups and all(str(pid) in (d / "cgroup.procs").read_text().split() for d in vmm.cgroups)
    mem = next(d for d in vmm.cgroups if "memory" in str(d) or len(vmm.cgroups) == 1)
    limit = (mem / ("memory.max" if len(vmm.cgroups) == 1 else "memory.limit_in_bytes")).read_text()
    overhead = qemu.MEMORY_OVERHEAD_MIB if vmm.accel is Accel.KVM else qemu.TCG_MEMORY_OVERHEAD_MIB
    assert int(limit) == (vmm.spec.memory_mib + overhead) << 20
    _wait_console(vmm, "dispo-init: ready")
    vmm.stop()
    # Exit status 0 and the init's own words: it powered off on the ACPI button (SIGTERM would give -15).
    assert vmm.wait_exit(0) == 0 and not is_same_process(pid, entry.args["starttime"])
    assert "powering off" in vmm.console_tail(40)
    vm_journal.unwind()  # the session's end: its cgroups and uid claim go too
    assert not any(d.exists() for d in vmm.cgroups) and not list((tmp_path / "state" / "vmm-ids").iterdir())


@pytest.mark.root
@pytest.mark.vm
def test_stop_falls_back_to_signals(product: Path, vm_journal: Journal, tmp_path: Path) -> None:
    # init=/bin/cat ignores the power button: stop() must escalate to SIGTERM within its deadline.
    vmm = qemu.create(_guest_spec(product, vm_journal, tmp_path, "init=/bin/cat"))
    vmm.start(vm_journal)
    _wait_console(vmm, "Running /scripts/init-bottom ... done")
    vmm.stop(timeout=1.0)
    # QEMU says so when a signal ends it (and exits 0 on SIGTERM): the evidence that stop() escalated.
    assert not vmm.running() and "terminating on signal" in vmm.log_path.read_text(), vmm.log_path.read_text()


@pytest.mark.root
@pytest.mark.vm
def test_gc_kills_the_vmm_of_a_dead_owner(product: Path, vm_journal: Journal, tmp_path: Path) -> None:
    vmm = qemu.create(_guest_spec(product, vm_journal, tmp_path, "init=/bin/cat"))
    vmm.start(vm_journal)
    pid = vmm.pid
    assert pid is not None
    start = next(e for e in vm_journal.entries if e.kind == "process").args["starttime"]
    vm_journal.release()  # the owner "dies" without tearing down
    report = journal_mod.gc(tmp_path / "state")
    assert report.reclaimed == [vm_journal.session_id], report
    vmm.wait_exit(5)
    assert not is_same_process(pid, start)
    assert not vm_journal.path.exists()


@pytest.mark.vm
def test_kvm_probe_answers(product: Path) -> None:
    # Whatever this host says, the probe must decide quickly and not leave a QEMU behind.
    accel.probe_kvm(product / "vmlinuz", timeout=20)
    out = subprocess.run(["pgrep", "-f", "dispo-probe-none"], capture_output=True, text=True, check=False).stdout
    assert out.strip() == ""


def test_the_console_log_is_capped(tmp_path: Path) -> None:
    """The guest controls its serial console: whatever it prints, the host keeps `cap` bytes and a marker,
    and the writer is never blocked (the rest is read and dropped)."""
    from dispo.vmm.base import pump_console

    r, w = os.pipe()
    log = tmp_path / "console.log"
    t = pump_console(os.fdopen(r, "rb"), log, cap=100_000)
    with os.fdopen(w, "wb") as out:
        for _ in range(50):
            out.write(b"x" * 10_000)  # 500 kB: would block on a full pipe if the rest were not read
    t.join(10)
    data = log.read_bytes()
    assert not t.is_alive()
    assert data.startswith(b"x" * 100_000)
    assert data[100_000:] == b"\n[dispo: console output over 100000 bytes dropped]\n"


@pytest.fixture(autouse=True)
def _release_held_ram() -> Iterator[None]:
    yield
    qemu.HELD_RAM.release()


def _memfds_here(name: str) -> list[str]:
    return [n for n in os.listdir("/proc/self/fd") if _link(f"/proc/self/fd/{n}") == f"/memfd:{name} (deleted)"]


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_a_restore_after_the_last_clone_finds_the_ram_this_process_held_and_it_goes_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dispod's sessions one after another: the clone before is gone (nothing maps the memfd), the next restore
    gets the same memfd from this process's hold instead of a new copy; the hold ends after RAM_LINGER_S."""
    size = 4 << 20
    ram = _template_ram(tmp_path, size)
    fd = qemu.shared_ram(ram, size)
    first = os.fstat(fd).st_ino
    os.close(fd)  # the clone's QEMU is gone
    again = qemu.shared_ram(ram, size)
    assert os.fstat(again).st_ino == first and os.pread(again, 5, 4096) == b"guest"
    os.close(again)
    qemu.HELD_RAM.release()
    assert _memfds_here(qemu._ram_name(ram)) == []
    fresh = qemu.shared_ram(ram, size)
    assert os.fstat(fresh).st_ino != first  # nothing held it: filled anew
    os.close(fresh)
    # A hold ends by itself once its time is up (here at once): the memfd is closed, nothing of it stays.
    monkeypatch.setattr(qemu, "RAM_LINGER_S", 0.0)
    os.close(qemu.shared_ram(ram, size))
    deadline = time.monotonic() + 30
    while _memfds_here(qemu._ram_name(ram)):
        assert time.monotonic() < deadline, "the held memfd was never closed"
        time.sleep(0.05)
