"""The Firecracker backend: one firecracker process per guest, driven over its API socket.

Start: journal the socket/files, spawn the process behind a gate (so its pid and starttime are
journaled *before* firecracker runs), wait for the socket, configure, InstanceStart.
Stop: SendCtrlAltDel (x86_64), then SIGTERM, then SIGKILL, each with a deadline; verify the pid is gone;
remove the socket (SIGTERM leaves it behind) and the jail.

aarch64 (on an arm64 host; Firecracker never emulates another architecture): the kernel is an uncompressed
arm64 Image (not an ELF vmlinux), the console is the 8250 UART Firecracker puts at MMIO 0x40002000 (ttyS0,
with earlycon for the first lines), and there is no keyboard controller, so no SendCtrlAltDel: stop goes
straight to SIGTERM (the session's disk is thrown away, so there is nothing to flush), and a guest that
powers itself off (PSCI SYSTEM_OFF, guest/init.sh) makes Firecracker exit. Logs, metrics and console live in the
session directory and go with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dispo import kernels
from dispo.errors import ApiError, GuestFailure, NotFound, PermissionProblem, SpawnFailed, VmmError
from dispo.infra import fswait, processes
from dispo.infra.journal import Entry, Journal
from dispo.vmm import sandbox
from dispo.vmm.accel import Accel
from dispo.vmm.base import Capability, MachineSpec, VmmKind, pump_console, tail
from dispo.vmm.firecracker.api import FirecrackerApi, LogLevel, NetworkOverride, Request, SnapshotType
from dispo.vmm.firecracker.jailer import Jail, JailSpec, set_tap_owner

log = logging.getLogger(__name__)

_SUN_PATH_MAX = 107
ROOT_DRIVE = "rootfs"
SAVED = "firecracker.json"   # beside a saved state: the taps and vsock it was made with
AGENT_VSOCK_PORT = 1024      # where the in-guest agent listens (guest/agent.pl)


@dataclass(frozen=True)
class FirecrackerOptions:
    binary: Path
    jail: JailSpec | None = None
    socket_timeout: float = 5.0
    log_level: LogLevel = LogLevel.INFO
    vsock_cid: int | None = None
    entropy: bool = False
    track_dirty_pages: bool = False      # needed for diff snapshots
    shutdown_grace: float = 5.0          # how long stop() waits for the guest after SendCtrlAltDel
    on_request: Callable[[Request], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Snapshot:
    state: Path          # host paths
    mem: Path
    kind: SnapshotType
    taps: tuple[str, ...]
    vsock: Path | None


def check_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        raise PermissionProblem("/dev/kvm does not exist: KVM is not available on this host",
                                hint="enable VT-x/AMD-V (or nested virtualization) or use the QEMU backend")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise PermissionProblem("no read/write access to /dev/kvm",
                                hint="run dispo as root or add the user to the kvm group")


def _short(path: Path, session_id: str) -> Path:
    """`path`, or a short stand-in under /tmp when it is too long for a unix socket address."""
    if len(str(path)) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"dispo-{session_id}-{digest}-{path.name}"


def _arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())


AARCH64_EARLYCON = "earlycon=uart,mmio,0x40002000"  # Firecracker's aarch64 serial (an 8250 at this address)


def boot_args(cmdline: tuple[str, ...], machine: str) -> tuple[str, ...]:
    """The kernel arguments Firecracker passes on `machine`: on aarch64 the console is its 8250 (ttyS0), not
    QEMU virt's PL011 (ttyAMA0) an arm64 image names, with an early console on the same UART; x86-only
    arguments (reboot=k: the keyboard controller) go."""
    if machine != "aarch64":
        return cmdline
    out = tuple("console=ttyS0" if a.startswith("console=ttyAMA") else a for a in cmdline if a != "reboot=k")
    if not any(a.startswith("console=") for a in out):
        out = ("console=ttyS0", *out)
    if not any(a.startswith("earlycon") for a in out):
        out = (AARCH64_EARLYCON, *out)
    return out


def can_send_ctrl_alt_del(machine: str) -> bool:
    """SendCtrlAltDel is an i8042 key press: x86_64 only (Firecracker's API refuses it on aarch64)."""
    return machine == "x86_64"


class FirecrackerVmm:
    kind = VmmKind.FIRECRACKER
    accel = Accel.KVM  # Firecracker has no other
    capabilities = frozenset({Capability.PAUSE, Capability.SNAPSHOT})

    def __init__(self, spec: MachineSpec, options: FirecrackerOptions) -> None:
        self.spec = spec
        self.options = options
        self.jail = Jail(options.jail, spec.session_id) if options.jail else None
        w = spec.workdir
        self.log_path = w / "firecracker.log"
        self.metrics_path = w / "firecracker.metrics"
        # Templates and their clones (spec.extra "agent") without a jail name their disk and vsock relative to
        # firecracker's working directory (the state dir): a snapshot then names the same paths in every
        # clone, as the jail's chroot does, and each clone's own files sit behind them.
        self.relative = self.jail is None and bool(spec.extra.get("agent"))
        self.vsock_path = (self.jail.root / "vsock.sock" if self.jail else w / "vsock.sock" if self.relative
                           else _short(w / "vsock.sock", spec.session_id))
        self.socket = self.jail.socket if self.jail else _short(w / "firecracker.sock", spec.session_id)
        self._proc: subprocess.Popen[bytes] | None = None
        self._starttime = ""
        self._entries: list[Entry] = []
        self._journal: Journal | None = None
        self._started = False
        self.api: FirecrackerApi | None = None
        self.timings: dict[str, float] = {}

    # -- Vmm interface ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def check(self) -> None:
        """Binary, /dev/kvm, kernel and disk usable: one clear error before anything is created."""
        binary = self.jail.executable if self.jail else self.options.binary
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise NotFound(f"firecracker binary {binary} is missing or not executable",
                           hint="install one with 'dispo firecracker install' or set $DISPO_FIRECRACKER")
        check_kvm()
        if _arch() == "aarch64":  # an uncompressed arm64 Image (PE/"ARM\x64" header), not an ELF
            kernels.check_arm64_image(self.spec.kernel)
        else:
            kernels.check_vmlinux(self.spec.kernel, _arch())
        for what, path in (("disk", self.spec.rootfs), ("initrd", self.spec.initrd)):
            if path is not None and not path.is_file():
                raise NotFound(f"{what} file {path} does not exist", hint="check the image")

    def running(self) -> bool:
        # pid + start time, not poll(): true from any process, and never for a reused pid.
        return self._proc is not None and processes.is_same_process(self._proc.pid, self._starttime)

    def start(self, journal: Journal) -> None:
        """Start the process, configure the machine from the spec and boot it (InstanceStart)."""
        self.check()
        self._launch(journal)
        try:
            self._configure()
            self._api().instance_start()
            self._started = True
        except BaseException:
            self.kill()
            raise

    def restore(self, journal: Journal, snapshot: Snapshot, *, resume: bool = True) -> None:
        """Start a fresh process and load `snapshot` into it, pointing it at this spec's taps and vsock."""
        self._launch(journal)
        try:
            api = self._api()
            if self.relative:
                self._link_disk()
            state, mem = snapshot.state, snapshot.mem
            if self.jail:  # the snapshot files must be inside this process's chroot
                state = self.jail.place(snapshot.state, "snapshot.state", writable=False)
                mem = self.jail.place(snapshot.mem, "snapshot.mem", writable=False)
                self.jail.place(self.spec.rootfs, "rootfs.ext4", writable=True)
            taps = tuple(n.tap for n in self.spec.nets)
            overrides = [NetworkOverride(f"eth{i}", tap) for i, tap in enumerate(taps)] if taps != snapshot.taps else []
            vsock = self._inside(self.vsock_path) if self.options.vsock_cid is not None else None
            if vsock is not None and not self.jail:
                self._record_path(self.vsock_path)
            dirty = self.options.track_dirty_pages or None
            try:
                api.snapshot_load(state, mem, resume_vm=resume, network_overrides=overrides,
                                  vsock_uds_path=vsock if vsock != snapshot.vsock else None,
                                  track_dirty_pages=dirty)
            except ApiError as e:
                if "unknown field `network_overrides`" in e.fault:  # (a list of known fields may name it too)
                    raise VmmError(f"this firecracker ({self.options.binary.name}) cannot attach a restored guest to "
                                   f"its own tap (no network_overrides in its snapshot API)",
                                   hint="use a newer Firecracker (1.14 has it) with its jailer, or --cold") from None
                # vsock_override is newer than some releases (1.14 lacks it); the request is refused
                # before anything is loaded, so retry binding the vsock where the snapshot had it.
                if "vsock_override" not in e.fault or snapshot.vsock is None:
                    raise
                old = (self.jail.connect_path(snapshot.vsock.name) if self.jail and self.jail.spec.own
                       else self.jail.host(snapshot.vsock) if self.jail else snapshot.vsock)
                if not self.jail:
                    self._record_path(old)
                    old.unlink(missing_ok=True)
                self.vsock_path = old
                api.snapshot_load(state, mem, resume_vm=resume, network_overrides=overrides,
                                  track_dirty_pages=dirty)
            self._started = True
        except BaseException:
            self.kill()
            raise

    def wait_exit(self, timeout: float | None = None) -> int | None:
        return processes.exit_status(self._proc, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the guest to power off, then SIGTERM, then SIGKILL; verify it is gone; remove socket and jail."""
        if self._proc is None:
            return
        t0 = time.monotonic()
        if self._started and self._proc.poll() is None and can_send_ctrl_alt_del(_arch()):
            try:
                # A paused guest cannot react to the key press: go straight to SIGTERM.
                if self._api().describe_instance().get("state") == "Paused":
                    raise VmmError("paused")
                self._api().send_ctrl_alt_del()
            except VmmError as e:
                log.debug("SendCtrlAltDel: %s", e)
            else:
                self.wait_exit(min(self.options.shutdown_grace, timeout / 2))
        remaining = max(0.5, timeout - (time.monotonic() - t0))
        self._terminate(remaining / 2, remaining / 2)
        self._undo_entries()

    def kill(self) -> None:
        if self._proc is not None:
            self._terminate(0.0, 5.0)
            self._undo_entries()

    def console_tail(self, lines: int = 20) -> str:
        return tail(self.spec.console_log, lines)

    def failure(self, what: str) -> GuestFailure:
        """A one-line error about the guest, with the console tail (which also has Firecracker's own output)."""
        return GuestFailure(what, console_tail=self.console_tail(),
                            hint=f"the console log is {self.spec.console_log} while the session lives")

    # -- snapshots --------------------------------------------------------------------------------
    def pause(self) -> None:
        self._api().pause()

    def resume(self) -> None:
        self._api().resume()

    def snapshot(self, dest: Path, *, kind: SnapshotType = SnapshotType.FULL) -> Snapshot:
        """Pause (if needed) and write a snapshot; the files land in `dest` (or the chroot when jailed)."""
        api = self._api()
        if api.describe_instance().get("state") != "Paused":
            api.pause()
        dest.mkdir(parents=True, exist_ok=True)
        state, mem = dest / "snapshot.state", dest / f"snapshot.mem.{kind.value.lower()}"
        if self.jail:
            state_in, mem_in = self.jail.inside(state.name), self.jail.inside(mem.name)
        else:
            state_in, mem_in = state, mem
        api.snapshot_create(state_in, mem_in, snapshot_type=kind)
        if self.jail:  # out of the chroot, which goes away with this process
            for inside, host in ((state_in, state), (mem_in, mem)):
                self.jail.take_out(inside, host)
        vsock = self._inside(self.vsock_path) if self.options.vsock_cid is not None else None
        return Snapshot(state, mem, kind, tuple(n.tap for n in self.spec.nets), vsock)

    # -- templates (the Vmm protocol's save_state / load_state / agent) ----------------------------
    def save_state(self, dest: Path) -> None:
        snap = self.snapshot(dest)
        meta = {"state": snap.state.name, "mem": snap.mem.name, "taps": list(snap.taps),
                "vsock": str(snap.vsock) if snap.vsock else None}
        (dest / SAVED).write_text(json.dumps(meta) + "\n")

    def load_state(self, journal: Journal, src: Path) -> None:
        try:
            meta = json.loads((src / SAVED).read_text())
            snap = Snapshot(src / str(meta["state"]), src / str(meta["mem"]), SnapshotType.FULL,
                            tuple(map(str, meta["taps"])), Path(meta["vsock"]) if meta.get("vsock") else None)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NotFound(f"template state in {src} is unreadable ({e})", hint="rebuild the template") from None
        if self.jail is None and not self.relative:
            # Firecracker reopens the disk at the path the snapshot names: a jail's chroot or a relative
            # name gives every clone the same one.
            raise VmmError("a Firecracker template is restored into a jail, or with the agent's relative paths",
                           hint="start with --cold")
        self.restore(journal, snap, resume=False)

    def agent(self, timeout: float = 5.0) -> socket.socket:
        """The agent's vsock port through Firecracker's unix socket (its "CONNECT <port>" handshake)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.vsock_path))
            sock.sendall(f"CONNECT {AGENT_VSOCK_PORT}\n".encode())
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 64:
                chunk = sock.recv(1)
                if not chunk:
                    break
                reply += chunk
            if not reply.startswith(b"OK "):
                raise ConnectionRefusedError(f"vsock port {AGENT_VSOCK_PORT}: no agent listens")
        except OSError:
            sock.close()
            raise
        return sock

    # -- internals --------------------------------------------------------------------------------
    def _api(self) -> FirecrackerApi:
        if self.api is None:
            raise VmmError(f"firecracker for session {self.spec.session_id} is not running")
        return self.api

    def _inside(self, host: Path) -> Path:
        """How firecracker names a host path: unchanged, relative to the chroot, or to its working directory."""
        if self.relative and host.parent == self.spec.workdir:
            return Path(host.name)
        if self.jail is None:
            return host
        return self.jail.inside(host.name)

    def _link_disk(self) -> Path:
        """rootfs.ext4 in the (root-only) state dir, pointing at the session's disk: the relative name firecracker
        gets, so a snapshot of it means "this session's disk" in every clone."""
        link = self.spec.workdir / "rootfs.ext4"
        self._record_path(link)
        link.unlink(missing_ok=True)
        link.symlink_to(self.spec.rootfs)
        return Path(link.name)

    def _record_path(self, path: Path) -> None:
        assert self._journal is not None
        self._entries.append(self._journal.record("path", path=str(path)))

    def _launch(self, journal: Journal) -> None:
        binary = self.jail.executable if self.jail else self.options.binary
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise NotFound(f"firecracker binary {binary} is missing or not executable",
                           hint="install one with 'dispo firecracker install' or set $DISPO_FIRECRACKER")
        check_kvm()
        if not (self.jail and self.jail.spec.own) and len(str(self.socket)) > _SUN_PATH_MAX:
            raise VmmError(f"API socket path {self.socket} is longer than a unix socket allows",
                           hint="use a shorter jail chroot base")
        self._journal = journal
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        if self.jail:
            self._entries += self.jail.prepare(journal)
            if self.jail.spec.own:  # firecracker binds relative names; dispo connects through a short path
                self.socket = self.jail.connect_path(self.socket.name)
                self.vsock_path = self.jail.connect_path(self.vsock_path.name)
        paths = [self.log_path, self.metrics_path, self.spec.console_log]
        if not self.jail:
            paths.insert(0, self.socket)
            self.socket.unlink(missing_ok=True)  # a stale socket makes firecracker exit 1
        # The instance id (alphanumerics and '-') carries the session id into ps and the log lines;
        # under the jailer, the jail id is passed on as the instance id. The logger and metrics are set on the
        # command line (two API requests fewer on every start and restore): firecracker opens them as it starts.
        logging = ["--log-path", str(self._inside(self.log_path)), "--level", self.options.log_level.value,
                   "--show-level", "--metrics-path", str(self._inside(self.metrics_path))]
        argv = (self.jail.argv(logging) if self.jail
                else [str(binary), "--api-sock", str(self.socket), "--id", f"dispo-{self.spec.session_id}", *logging])
        t0 = time.monotonic()
        self._spawn(journal, argv, paths)
        self.api = FirecrackerApi(self.socket, on_request=self.options.on_request)
        self._wait_socket()
        self.timings["socket"] = time.monotonic() - t0

    def _set_proc(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        if self.jail is not None and self.jail.cgroups:
            # Still the gate (before exec): into its cgroups before firecracker runs a single instruction.
            sandbox.place(self.jail.cgroups, proc.pid)

    def _spawn(self, journal: Journal, argv: list[str], paths: list[Path]) -> None:
        """Spawn behind the gate; `paths` (socket, log, metrics, console: none exists yet) are journaled in the
        same write as the process, before it runs."""
        own = self.jail if self.jail is not None and self.jail.spec.own else None
        setpriv, outer = own.sandbox_args() if own is not None else ([], [])
        cwd = own.root if own is not None else self.spec.workdir  # own sandbox: every path is relative to it
        try:
            # Not waiting for the tie to the parent (setpriv's prctl): _wait_socket waits for the socket, which
            # only firecracker itself binds, after it.
            spawned = processes.spawn_recorded(journal, argv, what="firecracker", stdout=subprocess.PIPE,
                                               cwd=cwd, on_spawn=self._set_proc, setpriv=setpriv, outer=outer,
                                               also=[("path", {"path": str(path)}) for path in paths],
                                               before_go=self._make_log_files, wait_tied=False)
        except SpawnFailed as e:  # nothing of firecracker's ran: its console is still empty
            raise VmmError(f"firecracker launcher: {e.message}", hint=e.hint) from None
        self._starttime = spawned.starttime
        self._entries += [*spawned.others, spawned.entry]
        # Its stdout is the guest's serial console: pumped into console.log (root's alone), capped.
        self.spec.console_log.touch(mode=0o600)
        assert spawned.proc.stdout is not None
        pump_console(spawned.proc.stdout, self.spec.console_log)

    def _wait_socket(self) -> None:
        assert self._proc is not None and self.api is not None
        # Where the socket appears on the host: its own path, or (dispo's own sandbox) its name in the jail
        # directory dispo made, which firecracker works in (dispo connects through a shorter path to it).
        appears = self.socket if self.jail is None else self.jail.socket if self.jail.spec.own else None
        if appears is not None and appears.parent.is_dir():
            self._wait_socket_event(appears)
            return
        # The jailer's: the socket's directory is made by the jailer after the spawn, so there is nothing to watch
        # yet (nor when the directory is missing: firecracker then exits); look every 2 ms.
        deadline = time.monotonic() + self.options.socket_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._exited_early()
            if self.socket.exists() and self.api.ping():
                return
            time.sleep(0.002)
        self.kill()
        raise VmmError(f"firecracker API socket {self.socket} did not appear within {self.options.socket_timeout} s")

    def _wait_socket_event(self, appears: Path) -> None:
        """Wake on the socket's creation (inotify) or the process's exit (pidfd), then connect: firecracker
        binds and listens in one call, so a refused connect is only the microseconds between the two."""
        assert self._proc is not None
        deadline = time.monotonic() + self.options.socket_timeout
        try:
            fswait.wait_for_file(appears, self._proc.pid, self.options.socket_timeout)
        except fswait.ProcessExited:
            self._proc.wait(1.0)
            self._exited_early()
        except TimeoutError:
            self.kill()
            raise VmmError(f"firecracker API socket {self.socket} did not appear within "
                           f"{self.options.socket_timeout} s") from None
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(str(self.socket))
                return
            except (ConnectionRefusedError, FileNotFoundError):
                if self._proc.poll() is not None:
                    self._exited_early()
                if time.monotonic() > deadline:
                    self.kill()
                    raise VmmError(f"firecracker API socket {self.socket} did not accept connections within "
                                   f"{self.options.socket_timeout} s") from None
                time.sleep(0.0002)
            finally:
                probe.close()

    def _exited_early(self) -> None:
        assert self._proc is not None
        rc = self._proc.returncode
        said = tail(self.jail.host(self._inside(self.log_path)) if self.jail else self.log_path, 3)
        self._undo_entries()
        raise VmmError(f"firecracker exited with code {rc} before its API socket appeared: "
                       f"{said or self.console_tail(3)}", hint="see the log lines above")

    def _make_log_files(self) -> None:
        """The log and metrics files, before firecracker opens them (v1.7 opens them without O_CREAT)."""
        for host in (self.log_path, self.metrics_path):
            if self.jail:  # made fresh for the jail user, by descriptor
                self.jail.make_file(self._inside(host))
            else:
                host.touch()

    def _configure(self) -> None:
        api, spec = self._api(), self.spec
        api.put_machine_config(vcpu_count=spec.vcpus, mem_size_mib=spec.memory_mib,
                               track_dirty_pages=self.options.track_dirty_pages or None)
        kernel, rootfs, initrd = spec.kernel, spec.rootfs, spec.initrd
        if self.jail:
            kernel = self.jail.place(spec.kernel, "vmlinux", writable=False)
            rootfs = self.jail.place(spec.rootfs, "rootfs.ext4", writable=True)
            initrd = self.jail.place(spec.initrd, "initrd", writable=False) if spec.initrd else None
        elif self.relative:
            rootfs = self._link_disk()
        api.put_boot_source(kernel, boot_args=" ".join(boot_args(spec.cmdline, _arch())) or None, initrd_path=initrd)
        api.put_drive(ROOT_DRIVE, rootfs, is_root_device=True)
        for i, volume in enumerate(spec.volumes):
            # A kept volume: hard-linked into the jail (place() with writable), so the guest writes the file.
            path = self.jail.place(volume, f"volume{i}.ext4", writable=True) if self.jail else volume
            api.put_drive(f"volume{i}", path, is_root_device=False)
        for i, net in enumerate(spec.nets):
            if self.jail:  # firecracker runs as the jail user without CAP_NET_ADMIN: it must own the tap
                set_tap_owner(net.tap, *self.jail.ids)
            api.put_network_interface(f"eth{i}", net.tap, guest_mac=net.mac)
        if self.options.vsock_cid is not None:
            if not self.jail:
                self._record_path(self.vsock_path)
                self.vsock_path.unlink(missing_ok=True)
            api.put_vsock(self.options.vsock_cid, self._inside(self.vsock_path))
        if self.options.entropy:
            api.put_entropy()

    def _terminate(self, term_timeout: float, kill_timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            processes.terminate(proc.pid, self._starttime, term_timeout=term_timeout, kill_timeout=kill_timeout)
            try:
                proc.wait(1.0)  # reap (terminate() may already have)
            except subprocess.TimeoutExpired:
                raise VmmError(f"firecracker {proc.pid} did not exit") from None
        if self.api is not None:
            self.api.close()
            self.api = None
        self._started = False

    def _undo_entries(self) -> None:
        """Undo this VMM's journal entries now (process, socket, jail, cgroups), newest first."""
        if self._journal is None:
            return
        if self._proc is not None and self._proc.poll() is None:
            self._terminate(0.0, 5.0)
        keep = {self.log_path, self.metrics_path, self.spec.console_log}
        if self.jail is not None:  # the jail goes now: keep its log and metrics with the session
            for host in (self.log_path, self.metrics_path):
                inside = self.jail.host(self._inside(host))
                if inside.is_file():
                    shutil.copyfile(inside, host)
        for entry in reversed(self._entries):
            if entry.kind == "path" and Path(entry.args["path"]) in keep:
                continue  # left for the session's unwind, so the console can still be read after stop
            self._journal.undo_entry(entry)
        self._entries = [e for e in self._entries if e.kind == "path" and Path(e.args["path"]) in keep]
        if self.jail is not None:
            self.jail.close()
        if self.api is not None:
            self.api.close()
            self.api = None

