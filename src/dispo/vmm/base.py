"""The interface a session drives without knowing which VMM is behind it.

A backend turns a MachineSpec into a running guest. Its lifecycle:
    vmm = backend.create(spec)          # nothing exists yet
    vmm.start(journal)                  # records then creates its host objects (process, sockets)
    vmm.wait_exit(timeout) / vmm.stop() # graceful power-off, then SIGTERM, then SIGKILL; verifies the pid is gone
Every host object is recorded in the session journal before it is created (kind "process" with pid and
starttime for the VMM process, kind "path" for sockets/logs outside the session state dir), so the
journal's unwind or `dispo gc` can undo it after a crash.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Protocol

from dispo.errors import GuestFailure
from dispo.infra.journal import Journal
from dispo.settings import SETTINGS
from dispo.vmm.accel import Accel


class VmmKind(StrEnum):
    QEMU = "qemu"
    FIRECRACKER = "firecracker"


@dataclass(frozen=True)
class NetAttachment:
    tap: str            # host tap device, named with the session id
    mac: str            # guest MAC address


@dataclass(frozen=True)
class MachineSpec:
    session_id: str
    kernel: Path                   # bzImage for QEMU, ELF vmlinux for Firecracker (x86_64)
    rootfs: Path                   # the session's private disk (raw ext4)
    workdir: Path                  # per-session directory (state dir) for sockets, logs, pid files
    cmdline: tuple[str, ...] = ()  # kernel command line arguments
    initrd: Path | None = None
    memory_mib: int = int(SETTINGS["memory_mib"].default)
    vcpus: int = int(SETTINGS["vcpus"].default)
    nets: tuple[NetAttachment, ...] = ()
    # Disks kept on purpose (storage/volumes.py), read-write after the root disk; written through, not cached.
    volumes: tuple[Path, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # backend-specific knobs

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"


class Capability(StrEnum):
    PAUSE = "pause"        # pause() / resume()
    SNAPSHOT = "snapshot"  # save_state(dest) of a paused guest, load_state(journal, src) into a new process


class Vmm(Protocol):
    """What the runtime needs of a VMM; nothing above vmm/ names a concrete backend (vmm/registry.py)."""

    kind: VmmKind
    spec: MachineSpec
    accel: Accel
    capabilities: frozenset[Capability]

    @property
    def pid(self) -> int | None: ...

    def check(self) -> None:
        """Everything the VMM will open exists and can be used: one clear error before anything is created."""

    def running(self) -> bool:
        """The VMM process is alive; from any process (pid + start time), not only from its parent."""

    def failure(self, what: str) -> GuestFailure:
        """An error about the guest naming `what`, with the console tail."""

    def start(self, journal: Journal) -> None:
        """Record, then start the VMM process and boot the guest. Raises VmmError with the console tail."""

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """The VMM's exit code once it exited, or None if still running after `timeout`."""

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the guest to power off, then SIGTERM, then SIGKILL, each with a deadline; verify it is gone."""

    def kill(self) -> None:
        """SIGKILL now and reap."""

    def console_tail(self, lines: int = 20) -> str:
        """The last lines of the guest's serial console."""

    def pause(self) -> None:
        """Stop the vCPUs (Capability.PAUSE); raises Unsupported otherwise."""

    def resume(self) -> None:
        """Run the vCPUs again after pause()."""

    def save_state(self, dest: Path) -> None:
        """Pause the guest and write its memory and device state into the directory `dest` (Capability.SNAPSHOT).
        The disk is the caller's to copy while the guest stays paused."""

    def load_state(self, journal: Journal, src: Path) -> None:
        """Instead of start(): record, then start a VMM process that loads what save_state() wrote into `src`
        (read-only, never written: each session gets private memory). The guest is left paused."""

    def agent(self, timeout: float = 5.0) -> socket.socket:
        """A connected stream to the in-guest identity agent (guest/agent.pl) over the host-only channel."""


CONSOLE_CAP = 8 << 20  # bytes of a guest's serial console kept on the host


def pump_console(src: IO[bytes], path: Path, cap: int = CONSOLE_CAP) -> threading.Thread:
    """Copy what a VMM writes for the guest's serial console (a pipe) into the console log, `cap` bytes at
    most: the guest controls that stream, and one that prints forever must not fill the host's disk. What is
    over the cap is still read (the guest never blocks on it) and dropped, after one marker line."""

    def copy() -> None:
        written = 0
        with contextlib.suppress(OSError, ValueError), src, open(path, "ab") as log:
            while chunk := os.read(src.fileno(), 65536):
                if written >= cap:
                    continue
                part = chunk[:cap - written]
                log.write(part)
                written += len(part)
                if written >= cap:
                    log.write(b"\n[dispo: console output over %d bytes dropped]\n" % cap)
                log.flush()

    t = threading.Thread(target=copy, name=f"dispo-console-{path.parent.name}", daemon=True)
    t.start()
    return t


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a console log (or an app's), tolerant of binary noise and carriage returns."""
    try:
        text = path.read_bytes()[-64 * 1024:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])
