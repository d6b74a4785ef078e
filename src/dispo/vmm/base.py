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

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from dispo.errors import VmmError
from dispo.journal import Journal


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
    memory_mib: int = 512
    vcpus: int = 1
    nets: tuple[NetAttachment, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # backend-specific knobs

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"


class Vmm(Protocol):
    kind: VmmKind
    spec: MachineSpec

    @property
    def pid(self) -> int | None: ...

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


class GuestFailure(VmmError):
    """The VMM or its guest failed; carries the console tail for the CLI to show above the one-line error."""

    def __init__(self, message: str, *, hint: str = "", console_tail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.console_tail = console_tail


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a console log, tolerant of binary noise and carriage returns."""
    try:
        text = path.read_bytes()[-64 * 1024:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])
