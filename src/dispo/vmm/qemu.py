"""The QEMU backend: a `-M microvm` guest with virtio-mmio disk, net and rng, serial console to a file.

An aarch64 guest (an arm64 image, its kernel an arm64 Image) runs in `qemu-system-aarch64 -M virt` with the
same virtio-mmio devices, which virt describes in its device tree; its console is the PL011 (ttyAMA0), and
system_powerdown presses the GPIO power key (the guest's "gpio-keys" input device). It runs under KVM only
on an arm64 host where KVM works, else under TCG (on an x86_64 host always: emulation).

The VMM process is journaled before QEMU runs: it is started behind a one-line gate (`sh -c 'read; exec
qemu'`), recorded as kind "process" (pid + starttime, unchanged by exec), and only then let through, so no
QEMU ever runs that the journal does not know. Its QMP socket, console log and QEMU's own output live in the
session state directory and go with it.

Stop: QMP system_powerdown (the guest init powers off on the ACPI power button), then SIGTERM, then
SIGKILL, each with a deadline; the process is verified gone. `kill()` skips the guest: what a disposable
session ends with when nothing of its guest is kept.

Templates (Capability.SNAPSHOT). A guest that may be saved (spec.extra["template"]) has its RAM in a memfd
dispo made (memory-backend-file, share=on) and migration's x-ignore-shared set: `save_state(dir)` stops the
vCPUs, migrates only the device state into `memory.qemu` (QMP getfd + migrate "fd:"), and copies the RAM
from the memfd into `ram.qemu` (holes where the guest never wrote). `load_state(journal, dir)` starts a new
QEMU with the same devices whose RAM maps the template's RAM *privately* (share=off: MAP_PRIVATE, copy on
write) and `-incoming fd:N` on the device state: untouched pages are the same physical pages in every
clone of the template alive at once.

What the clones map is not the template's file itself: QEMU 7.2 (Debian 12) opens a memory-backend-file
read-write unless readonly=on, and readonly=on maps it read-only (the guest cannot run; 8.2 added the
read-only open + private writable mapping). So the first clone gets a memfd filled from the file (opened
read-only by dispo) and sealed (F_SEAL_WRITE/SHRINK/GROW/SEAL: no write(), no shared writable mapping, no
resize, not even by a QEMU a guest took over); later clones reopen that memfd from a live clone's QEMU
(`shared_ram`), after checking it is dispo's (root's, sealed, named after the file's identity, its size).
It goes with the last clone that maps it, or a minute after the last restore in the process that made or found
it (`RamHold`: dispod's next session finds it even when no clone is alive). The template's files are never
opened for writing.
Every guest also has a virtio-serial port "dispo.agent" on a socket in the state dir: the host-only
channel to the identity agent (guest/agent.pl).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispo import arch as arches
from dispo import kernels
from dispo.errors import GuestFailure, NotFound, SpawnFailed, VmmError
from dispo.infra import processes
from dispo.infra.journal import Journal
from dispo.infra.proc import minimal_env, which
from dispo.vmm import sandbox
from dispo.vmm.accel import Accel, host_tsc_khz
from dispo.vmm.base import Capability, MachineSpec, VmmKind, pump_console, tail

log = logging.getLogger(__name__)

QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
MEMORY_FILE = "memory.qemu"     # a template's device state: QEMU's migration stream without the RAM
RAM_FILE = "ram.qemu"           # a template's guest RAM, as the guest left it (sparse)
RAM_MEMFD_PREFIX = "dispo-ram-"  # the sealed memfd clones of a template share (its name: the file's identity)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_CHUNK = 4 << 20
QMP_MAX_LINE = 1 << 20  # bytes of one QMP message; dispo's largest answer (query-status, getfd) is tiny
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]  # the RAM stays out of the migration stream
MIGRATE_TIMEOUT_S = 600.0
QEMU_LOG = "qemu.log"
START_TIMEOUT_S = 15.0
OWNER_ENV = "DISPO_STATE_DIR"
MEMORY_OVERHEAD_MIB = 256       # QEMU's own memory over guest RAM (the cgroup limit) under KVM
TCG_MEMORY_OVERHEAD_MIB = 1536  # ... under TCG, whose translation cache can grow to 1 GiB
POWERDOWN_TIMEOUT_S = 5.0
# The CPU a TCG aarch64 guest gets: a Neoverse N1 (Armv8.2 with LSE atomics and the crypto extensions, the
# server core Debian's arm64 binaries meet in practice), not `max`: no SVE/SME, pointer authentication or MTE
# to emulate, which costs time under TCG and which no guest here needs.
TCG_AARCH64_CPU = "neoverse-n1"


def guest_arch(kernel: Path) -> arches.Arch:
    """The guest's architecture, from its kernel's format (x86_64 when the file does not say)."""
    found = kernels.kernel_arch(kernel)
    return arches.get(found) if found else arches.AMD64


def qemu_hint(a: arches.Arch) -> str:
    return f"install {a.qemu_package} (apt-get install {a.qemu_package})"


class Qmp:
    """Just enough of the QEMU Machine Protocol: handshake, then one command at a time."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline(QMP_MAX_LINE + 1)  # capped while read: QEMU runs the guest's device models
        if not line:
            raise VmmError("QEMU closed its QMP socket")
        if len(line) > QMP_MAX_LINE:
            raise VmmError(f"QEMU sent a QMP message longer than {QMP_MAX_LINE} bytes")
        data: dict[str, Any] = json.loads(line)
        return data

    def command(self, name: str, *, fd: int | None = None, **arguments: Any) -> Any:
        """Run one command; with `fd`, the descriptor travels with it (SCM_RIGHTS), as getfd wants."""
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fd is None:
            self.file.write(data)
            self.file.flush()
        else:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise VmmError(f"QMP {name} failed: {reply['error'].get('desc', reply['error'])}")
            # anything else is an asynchronous event: skip it

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass(frozen=True)
class LaunchFds:
    """Descriptors QEMU inherits, by what they are."""

    kernel: int
    initrd: int | None
    disk_rw: int
    disk_ro: int
    qmp: int
    agent: int
    taps: tuple[int, ...] = ()
    incoming: int | None = None  # a template's saved state, read-only (restore)
    ram: int | None = None       # the guest's RAM: a memfd (saveable guest: shared; clone: sealed, private)
    volumes: tuple[tuple[int, int], ...] = ()  # (read-write, read-only) of each kept volume

    def all(self) -> tuple[int, ...]:
        optional = tuple(fd for fd in (self.initrd, self.incoming, self.ram) if fd is not None)
        kept = tuple(fd for pair in self.volumes for fd in pair)
        return (self.kernel, *optional, self.disk_rw, self.disk_ro, self.qmp, self.agent, *self.taps, *kept)


@dataclass
class QemuVmm:
    spec: MachineSpec
    accel: Accel = Accel.TCG
    guest: arches.Arch = arches.AMD64
    kind: VmmKind = VmmKind.QEMU
    capabilities: frozenset[Capability] = frozenset({Capability.PAUSE, Capability.SNAPSHOT})
    uid: int = 0  # the session's own uid/gid QEMU runs as (vmm/sandbox.py), once started
    cgroups: list[Path] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _start: str = ""
    _ram: int | None = field(default=None, repr=False)  # a saveable guest's RAM (memfd), kept for save_state

    @property
    def saveable(self) -> bool:
        return self.spec.extra.get("template") == "1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def qemu(self) -> str:
        return self.guest.qemu_system

    @property
    def qmp_path(self) -> Path:
        return self.spec.workdir / QMP_SOCKET

    @property
    def log_path(self) -> Path:
        return self.spec.workdir / QEMU_LOG

    @property
    def agent_path(self) -> Path:
        return self.spec.workdir / AGENT_SOCKET

    def cmdline(self) -> tuple[str, ...]:
        args = list(self.spec.cmdline)
        if (self.guest is arches.AMD64 and self.accel is Accel.TCG
                and not any(a.startswith("tsc_early_khz=") for a in args)):
            # Under TCG the guest's TSC calibration against the emulated PIT hangs about half the boots;
            # telling it the frequency skips the calibration.
            khz = host_tsc_khz()
            if khz:
                args.append(f"tsc_early_khz={khz}")
        return tuple(args)

    def argv(self, fds: LaunchFds) -> list[str]:
        """QEMU's command line; every host file it uses comes as a descriptor in `fds` (see vmm/sandbox.py)."""
        s = self.spec
        if self.guest is arches.ARM64:
            # virt: GICv3 where it can (more than 8 vCPUs, KVM's own GIC on an arm64 host); no ACPI firmware is
            # loaded (direct kernel boot, device tree), so the power button is virt's GPIO key.
            machine, cpu = "virt,gic-version=max", "host" if self.accel is Accel.KVM else TCG_AARCH64_CPU
        else:
            machine, cpu = "microvm,rtc=on", "host" if self.accel is Accel.KVM else "max"
        argv = [
            self.qemu, "-name", f"dispo-{s.session_id},process=dispo-{s.session_id}",
            "-M", machine, "-accel", self.accel.value, "-cpu", cpu,
            "-m", str(s.memory_mib), "-smp", str(s.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # QEMU's own seccomp filter: no spawning, no privilege changes, no obsolete syscalls.
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel", f"/proc/self/fd/{fds.kernel}", "-append", " ".join(self.cmdline()),
            "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
            # The disk as an fd set: QEMU asks for it read-only (probing) and read-write, so both are in it.
            "-add-fd", f"fd={fds.disk_rw},set=1", "-add-fd", f"fd={fds.disk_ro},set=1",
            # cache=unsafe: the disk is thrown away with the session, so flushes buy nothing. werror/rerror
            # report: a full workspace gives the guest I/O errors instead of pausing the VM forever.
            "-drive", "id=root,file=/dev/fdset/1,format=raw,if=none,cache=unsafe,discard=unmap,werror=report,"
                      "rerror=report",
            "-device", "virtio-blk-device,drive=root",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0",
            # QMP on a socket dispo bound (root-only state dir) and listens on: QEMU only accepts.
            "-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            # The identity agent's channel: a virtio-serial port, host side on a socket dispo listens on.
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=agent,fd={fds.agent},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=dispo.agent,nr=1",
        ]
        if fds.initrd is not None:
            argv += ["-initrd", f"/proc/self/fd/{fds.initrd}"]
        for i, (rw, ro) in enumerate(fds.volumes):
            # After the root disk, so the guest's /dev/vda stays the root; cache=writeback: a kept volume's
            # writes must reach the file (the guest's flushes are honoured).
            argv += ["-add-fd", f"fd={rw},set={2 + i}", "-add-fd", f"fd={ro},set={2 + i}",
                     "-drive", f"id=vol{i},file=/dev/fdset/{2 + i},format=raw,if=none,cache=writeback,werror=report,"
                               "rerror=report",
                     "-device", f"virtio-blk-device,drive=vol{i}"]
        for i, (net, tap) in enumerate(zip(s.nets, fds.taps, strict=True)):
            argv += ["-netdev", f"tap,id=n{i},fd={tap}",
                     "-device", f"virtio-net-device,netdev=n{i},mac={net.mac}"]
        if fds.ram is not None:
            # share=on: the building guest writes into dispo's memfd, which save_state copies; share=off: a
            # clone's writes go to its own copies of the pages (MAP_PRIVATE). x-ignore-shared on both sides:
            # the migration stream leaves the RAM out (the saving side's RAM is shared; the loading side maps it).
            # (7.2 has no -global for the capability: it is set over QMP before the migration, hence `defer`.)
            share = "on" if fds.incoming is None else "off"
            argv += ["-object", f"memory-backend-file,id=ram,size={s.memory_mib}M,mem-path=/proc/self/fd/{fds.ram},"
                                f"share={share}",
                     "-machine", "memory-backend=ram"]
        if fds.incoming is not None:
            argv += ["-incoming", "defer" if fds.ram is not None else f"fd:{fds.incoming}"]
        return argv

    # -- lifecycle --------------------------------------------------------------------------------
    def check(self) -> None:
        """Everything QEMU will open must exist: one clear error now instead of a QEMU message later."""
        which(self.qemu, hint=qemu_hint(self.guest))
        for what, path in (("kernel", self.spec.kernel), ("initrd", self.spec.initrd), ("disk", self.spec.rootfs)):
            if path is not None and not path.is_file():
                raise NotFound(f"{what} file {path} does not exist",
                               hint="rebuild or re-import the image ('dispo image build minimal --force')")

    def start(self, journal: Journal) -> None:
        ram = None
        if self.saveable:
            ram = os.memfd_create(f"dispo-building-{self.spec.session_id}", os.MFD_CLOEXEC)
            os.ftruncate(ram, self.spec.memory_mib << 20)
            self._ram = ram
        try:
            self._launch(journal, None, ram)
        except BaseException:
            self._close_ram()
            raise

    def load_state(self, journal: Journal, src: Path) -> None:
        """Instead of start(): a new QEMU loads the state save_state() wrote into `src`; the guest stays paused."""
        memory = src / MEMORY_FILE
        if not memory.is_file():
            raise NotFound(f"template state {memory} is missing", hint="rebuild the template")
        if not (src / RAM_FILE).is_file():
            raise NotFound(f"template {src.name} has its memory in the old format (no {RAM_FILE}: its clones "
                           "could not share it)", hint="rebuild it with 'dispo template build NAME'")
        # One restore of a template at a time finds or fills its memfd, until its QEMU holds it (where the next
        # one finds it): two clones started at once share it too. The lock is on the file, opened read-only.
        lock = os.open(src / RAM_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ram = shared_ram(src / RAM_FILE, self.spec.memory_mib << 20)
            try:
                fds = self._launch(journal, memory, ram)
            finally:
                os.close(ram)  # QEMU holds it now (and maps it): it lives as long as a clone does
        finally:
            os.close(lock)
        assert fds.incoming is not None
        q = Qmp(self.qmp_path, timeout=30)
        try:
            q.command("migrate-set-capabilities", capabilities=IGNORE_SHARED)
            q.command("migrate-incoming", uri=f"fd:{fds.incoming}")  # QEMU's own copy of the descriptor
            # The device state is small (the RAM stays out of it): asked on the same connection every 10 ms,
            # it is in within a few rounds.
            deadline = time.monotonic() + MIGRATE_TIMEOUT_S
            while True:
                status = str(q.command("query-status").get("status", ""))
                if status not in ("inmigrate", "prelaunch"):
                    break
                if time.monotonic() > deadline or not self.running():
                    raise self.failure(f"QEMU did not load the template's state (status {status})")
                time.sleep(0.01)
        finally:
            q.close()
        if status not in ("paused", "running"):
            raise self.failure(f"QEMU could not load the template's state (status {status})")

    def save_state(self, dest: Path) -> None:
        """Stop the vCPUs, write the device state into `dest`/memory.qemu and the RAM into `dest`/ram.qemu
        (new files)."""
        if self._ram is None:
            raise VmmError("this guest was not started to be saved (its RAM is not in a file)")
        q = Qmp(self.qmp_path, timeout=30)
        try:
            q.command("stop")
            fd = os.open(dest / MEMORY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                q.command("getfd", fd=fd, fdname="template")
            finally:
                os.close(fd)
            q.command("migrate-set-capabilities", capabilities=IGNORE_SHARED)
            q.command("migrate", uri="fd:template")
            deadline = time.monotonic() + MIGRATE_TIMEOUT_S
            while (info := q.command("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    raise VmmError(f"saving the guest's memory took over {MIGRATE_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
            if info.get("status") != "completed":
                raise VmmError(f"QEMU could not save the guest's memory: {info.get('error-desc', info.get('status'))}")
        finally:
            q.close()
        # The vCPUs are stopped and the device state written: the RAM no longer changes.
        out = os.open(dest / RAM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copy_sparse(self._ram, out, self.spec.memory_mib << 20)
        finally:
            os.close(out)
        self._close_ram()

    def agent(self, timeout: float = 5.0) -> socket.socket:
        """A stream to the in-guest agent (its virtio-serial port)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.agent_path))
        except OSError:
            sock.close()
            raise
        return sock

    def _status(self) -> str:
        q = Qmp(self.qmp_path, timeout=10)
        try:
            return str(q.command("query-status").get("status", ""))
        finally:
            q.close()

    def _stopped_vcpus(self) -> bool:
        try:
            return self._status() in ("paused", "postmigrate", "inmigrate", "prelaunch", "finish-migrate")
        except (OSError, VmmError, ValueError):
            return False

    def _close_ram(self) -> None:
        if self._ram is not None:
            os.close(self._ram)
            self._ram = None

    def _launch(self, journal: Journal, incoming: Path | None, ram: int | None = None) -> LaunchFds:
        self.check()
        self.spec.console_log.touch(mode=0o600)
        state_dir = journal.path.parent.parent
        self.uid = sandbox.allocate_id(journal, state_dir, self.spec.session_id)
        # Guest RAM plus what QEMU itself needs; TCG's translation cache is the big part under emulation.
        overhead = MEMORY_OVERHEAD_MIB if self.accel is Accel.KVM else TCG_MEMORY_OVERHEAD_MIB
        self.cgroups = sandbox.limit(journal, f"qemu-{self.spec.session_id}",
                                     memory_mib=self.spec.memory_mib + overhead,
                                     # one CPU over the vCPUs: QEMU's own threads (main loop, I/O) must not
                                     # starve the vCPU threads (with the quota at exactly the vCPUs, a TCG
                                     # guest took twice as long to boot)
                                     cpus=float(self.spec.vcpus + 1))
        try:
            with contextlib.ExitStack() as opened, open(self.log_path, "wb") as out:
                fds = self._open(opened, incoming, ram)
                # stdout: the serial console (chardev stdio), pumped into console.log with a cap;
                # stderr: QEMU's own messages. QEMU runs as the session's own uid without capabilities.
                spawned = processes.spawn_recorded(
                    journal, self.argv(fds), what="qemu", stdout=subprocess.PIPE, stderr=out,
                    on_spawn=self._set_proc, term_timeout="3", pass_fds=fds.all(),
                    # Its command line names no host path any more: its environment says whose it is
                    # (`dispo verify` and the tests find a session's VMM by it).
                    env=minimal_env({OWNER_ENV: str(state_dir), "DISPO_SESSION": self.spec.session_id}),
                    setpriv=sandbox.drop_args(self.uid, kvm=self.accel is Accel.KVM), outer=sandbox.hide_host())
            assert spawned.proc.stdout is not None
            pump_console(spawned.proc.stdout, self.spec.console_log)
        except SpawnFailed:
            raise VmmError(f"QEMU launcher exited at once: {tail(self.log_path, 3)}") from None
        except OSError as e:
            raise self.failure(f"QEMU could not be started ({e.strerror})") from None
        self._start = spawned.starttime
        self._wait_started()
        return fds

    def _open(self, opened: contextlib.ExitStack, incoming: Path | None = None, ram: int | None = None) -> LaunchFds:
        """What QEMU needs, opened by dispo: it gets descriptors, never paths of the host to open itself."""
        s = self.spec

        def keep(fd: int) -> int:
            opened.callback(os.close, fd)
            return fd

        def listen(path: Path) -> int:
            path.unlink(missing_ok=True)  # a leftover from a crash under the same id
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            opened.callback(listener.close)
            old = os.umask(0o177)  # the control sockets are root's alone from the start
            try:
                listener.bind(str(path))
            finally:
                os.umask(old)
            listener.listen(4)
            return listener.fileno()

        return LaunchFds(
            kernel=keep(sandbox.open_file(s.kernel)),
            initrd=keep(sandbox.open_file(s.initrd)) if s.initrd is not None else None,
            disk_rw=keep(sandbox.open_file(s.rootfs, write=True)), disk_ro=keep(sandbox.open_file(s.rootfs)),
            qmp=listen(self.qmp_path), agent=listen(self.agent_path),
            taps=tuple(keep(sandbox.open_tap(n.tap)) for n in s.nets),
            volumes=tuple((keep(sandbox.open_file(v, write=True)), keep(sandbox.open_file(v))) for v in s.volumes),
            incoming=keep(sandbox.open_file(incoming)) if incoming is not None else None, ram=ram)

    def _set_proc(self, proc: subprocess.Popen[bytes]) -> None:
        # Still the gate (before exec): into the session's cgroups before QEMU runs a single instruction.
        self._proc = proc
        sandbox.place(self.cgroups, proc.pid)

    def _wait_started(self) -> None:
        """Until QMP answers (QEMU parsed its arguments and opened every device), or QEMU exited."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.wait_exit(0) is not None:
                raise self.failure(f"QEMU exited at once with status {self._proc.returncode if self._proc else '?'}")
            if self.qmp_path.exists():
                try:
                    Qmp(self.qmp_path, timeout=2).close()
                    log.debug("qemu %s up (pid %s, %s)", self.spec.session_id, self.pid, self.accel.value)
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise self.failure(f"QEMU did not open its control socket within {START_TIMEOUT_S:.0f} s")

    def failure(self, what: str) -> GuestFailure:
        """An error naming the cause, with QEMU's last message and the console tail."""
        qemu_said = tail(self.log_path, 1).strip()
        detail = f": {qemu_said}" if qemu_said else ""
        return GuestFailure(f"{what}{detail}", console_tail=self.console_tail(),
                            hint="the console log is shown above; check the image's kernel and initrd")

    def running(self) -> bool:
        # pid + start time, not poll(): true from any process, and never for a reused pid.
        return self._proc is not None and processes.is_same_process(self._proc.pid, self._start)

    def _qmp(self, command: str) -> None:
        q = Qmp(self.qmp_path, timeout=5)
        try:
            q.command(command)
        finally:
            q.close()

    def pause(self) -> None:
        self._qmp("stop")

    def resume(self) -> None:
        self._qmp("cont")

    def wait_exit(self, timeout: float | None = None) -> int | None:
        return processes.exit_status(self._proc, timeout)

    def powerdown(self) -> bool:
        """Ask the guest to power off (ACPI power button). False if QMP is gone."""
        try:
            q = Qmp(self.qmp_path, timeout=2)
        except OSError:
            return False
        try:
            q.command("system_powerdown")
            return True
        except (OSError, VmmError, ValueError):
            return False
        finally:
            q.close()

    def stop(self, timeout: float = POWERDOWN_TIMEOUT_S) -> None:
        if self._proc is None:
            return
        deadline = time.monotonic() + timeout
        if self.running() and self._stopped_vcpus():
            deadline = 0.0  # a paused guest (a saved template, a pooled clone) cannot hear the power button
        # Pressed again every half second: a press before the guest's init listens is lost.
        t0 = time.monotonic()
        while self.running() and time.monotonic() < deadline and self.powerdown():
            if self.wait_exit(min(0.5, max(0.0, deadline - time.monotonic()))) is not None:
                log.info("qemu %s: the guest powered off on the power button in %.1f s", self.spec.session_id,
                         time.monotonic() - t0)
                return
        if self.running():
            log.info("qemu %s: no power-off from the guest, SIGTERM", self.spec.session_id)
        processes.terminate(self._proc.pid, self._start, term_timeout=3.0, kill_timeout=5.0)
        self._proc.wait()
        self._close_ram()

    def kill(self) -> None:
        """SIGKILL, no word to the guest: its disk is thrown away, nothing in it needs to reach a file."""
        self._close_ram()
        if self._proc is None:
            return
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._proc.wait()

    def console_tail(self, lines: int = 20) -> str:
        return tail(self.spec.console_log, lines)


# -- a template's RAM, shared by its clones ---------------------------------------------------------------
def copy_sparse(src: int, dst: int, size: int) -> None:
    """`size` bytes of src into dst (a new file), leaving holes where src has holes or zeros."""
    zero = bytes(_CHUNK)
    offset = 0
    while offset < size:
        try:
            offset = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: no data after offset
        end = min(size, os.lseek(src, offset, os.SEEK_HOLE))
        while offset < end:
            chunk = os.pread(src, min(_CHUNK, end - offset), offset)
            if not chunk:
                break
            if chunk != zero[:len(chunk)]:
                os.pwrite(dst, chunk, offset)
            offset += len(chunk)
    os.ftruncate(dst, size)


def _ram_name(path: Path) -> str:
    """The memfd's name: the template file's identity (a rebuilt template is another file, another name)."""
    st = os.stat(path, follow_symlinks=False)
    return f"{RAM_MEMFD_PREFIX}{st.st_dev:x}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _genuine(fd: int, size: int) -> bool:
    """Is fd a memfd dispo made and sealed (root's: an unprivileged QEMU cannot make one), of this size?"""
    st = os.fstat(fd)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and st.st_size == size and seals & _SEALS == _SEALS


def _find_ram(name: str, size: int) -> int | None:
    """The sealed memfd `name` from a live clone's QEMU (its process name is dispo-<session>), reopened."""
    target = f"/memfd:{name} (deleted)"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("dispo-"):
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{n}") != target:
                    continue
                fd = os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # gone meanwhile
            if _genuine(fd, size):
                return fd
            os.close(fd)
            log.warning("process %s holds a memfd named %s that dispo did not make; ignored", pid, name)
    return None


class RamHold:
    """The template RAM memfds this process filled or found, each held RAM_LINGER_S after the restore that last
    used it: a restore when no clone of the template is alive (sessions one after another through dispod)
    finds it here instead of reading the template's RAM file again (0.07 to 0.09 s for a minimal guest).
    A timer closes it; it never outlives the process (a descriptor, close-on-exec)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[int, threading.Timer]] = {}

    def find(self, name: str, size: int) -> int | None:
        """A new descriptor of the memfd `name` held here, or None."""
        with self._lock:
            got = self._held.get(name)
            return os.dup(got[0]) if got is not None and _genuine(got[0], size) else None

    def keep(self, name: str, fd: int) -> None:
        """Hold `fd`'s memfd (a copy of the descriptor) for RAM_LINGER_S from now."""
        timer = threading.Timer(RAM_LINGER_S, self._drop, args=(name,))
        timer.daemon = True
        with self._lock:
            old = self._held.pop(name, None)
            if old is not None:
                old[1].cancel()
                os.close(old[0])
            self._held[name] = (os.dup(fd), timer)
            timer.start()

    def _drop(self, name: str) -> None:
        with self._lock:
            got = self._held.get(name)
            if got is not None and got[1] is threading.current_thread():  # not kept again meanwhile
                del self._held[name]
                os.close(got[0])

    def release(self) -> None:
        """Close every held memfd now (a test's end)."""
        with self._lock:
            for fd, timer in self._held.values():
                timer.cancel()
                os.close(fd)
            self._held.clear()


RAM_LINGER_S = 60.0
HELD_RAM = RamHold()


def shared_ram(path: Path, size: int) -> int:
    """A sealed memfd with the template RAM file's content, shared with the clones of it alive now (or new), or
    held by this process since a recent restore (`RamHold`)."""
    try:
        name = _ram_name(path)
        if os.stat(path).st_size != size:
            raise VmmError(f"the template's RAM file {path} is not the guest's memory size",
                           hint="rebuild the template")
        found = HELD_RAM.find(name, size)
        if found is None:
            found = _find_ram(name, size)
        if found is not None:
            HELD_RAM.keep(name, found)
            return found
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                copy_sparse(src, fd, size)
            finally:
                os.close(src)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        HELD_RAM.keep(name, fd)
        return fd
    except OSError as e:
        raise VmmError(f"the template's memory could not be mapped: {e.strerror} ({path})",
                       hint="rebuild the template") from None


def create(spec: MachineSpec, accel: Accel | None = None) -> QemuVmm:
    """A QEMU VMM for spec, for the architecture of the spec's kernel; the accelerator is probed (once) with that
    kernel when not given. A guest of another architecture than the host's runs under TCG: KVM cannot run it."""
    guest = guest_arch(spec.kernel)
    if accel is None:
        from dispo.vmm.accel import choose

        if guest != arches.host() or not spec.kernel.is_file():
            accel = Accel.TCG
        else:
            accel = choose(spec.kernel, qemu=guest.qemu_system)
    return QemuVmm(spec, accel, guest)
