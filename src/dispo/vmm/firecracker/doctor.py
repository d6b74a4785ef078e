"""`dispo doctor`: is Firecracker usable here? Binaries, versions, the jailer pair, /dev/kvm, a real boot."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dispo.config import Config
from dispo.errors import DispoError
from dispo.infra.txn import transaction
from dispo.vmm.base import MachineSpec
from dispo.vmm.firecracker.binaries import find_firecracker, find_jailer, jail_pair, version_of
from dispo.vmm.firecracker.probe import GUEST_LINE, tiny_elf
from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm, check_kvm


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def _binary(label: str, find: object, cfg: Config) -> tuple[Check, Path | None]:
    try:
        path: Path = find(cfg)  # type: ignore[operator]
        return Check(label, Status.OK, f"{path} (v{version_of(path)})"), path
    except DispoError as e:
        return Check(label, Status.FAIL if label == "firecracker" else Status.WARN, e.one_line()), None


def probe_boot(cfg: Config, binary: Path, timeout: float = 5.0) -> Check:
    """Boot the probe guest and wait for its line on the console: proves KVM + binary work together."""
    with tempfile.TemporaryDirectory(prefix="dispo-doctor-") as d:
        kernel, disk = tiny_elf(Path(d) / "vmlinux"), Path(d) / "disk"
        disk.write_bytes(bytes(4096))
        with transaction(cfg, purpose="doctor probe") as s:
            vmm = FirecrackerVmm(MachineSpec(s.session_id, kernel, disk, s.state_path, memory_mib=16),
                                 FirecrackerOptions(binary=binary, shutdown_grace=1.0))
            t0 = time.monotonic()
            try:
                vmm.start(s.journal)
                deadline = t0 + timeout
                while time.monotonic() < deadline and GUEST_LINE not in vmm.spec.console_log.read_bytes():
                    time.sleep(0.005)
                ok = GUEST_LINE in vmm.spec.console_log.read_bytes()
                took = time.monotonic() - t0
            finally:
                vmm.stop(timeout=3)
    if ok:
        return Check("boots a guest", Status.OK, f"probe guest printed on the serial console in {took * 1000:.0f} ms")
    return Check("boots a guest", Status.FAIL, "the probe guest started but printed nothing")


def arch_checks() -> list[Check]:
    """What this host's architecture can run and build: a line for the host, one per guest architecture."""
    from dispo import arch as arches

    try:
        host = arches.host()
    except DispoError as e:
        return [Check("host", Status.FAIL, e.one_line())]
    checks = [Check("host", Status.OK, f"{host.machine} ({host.debian}): Firecracker runs {host.machine} guests "
                                       f"only; QEMU runs {host.machine} guests (KVM or TCG) and other "
                                       f"architectures under TCG emulation")]
    for a in arches.ARCHES:
        ways = arches.runnable(a)
        can = [f"{vmm} ({how})" for vmm, how in ways.items() if how]
        missing = [] if ways["qemu"] else [f"QEMU needs {a.qemu_system} (apt-get install {a.qemu_package})"]
        if a != host:
            missing.append("Firecracker never emulates")
            build = ("builds through qemu-user" if arches.binfmt_entry(a) else
                     f"builds need {a.qemu_user}-static in binfmt_misc (apt-get install qemu-user-static "
                     f"binfmt-support; dispo image build enables it)")
        else:
            build = "builds natively"
        detail = (f"runs on {', '.join(can)}" if can else "cannot run here") + (
            f"; {'; '.join(missing)}" if missing else "") + f"; {build}"
        checks.append(Check(f"{a.machine} guests", Status.OK if can else Status.WARN, detail))
    return checks


def run_checks(cfg: Config, *, boot: bool = True) -> list[Check]:
    checks: list[Check] = arch_checks()
    fc_check, fc = _binary("firecracker", find_firecracker, cfg)
    checks.append(fc_check)
    jail_check, _ = _binary("jailer", find_jailer, cfg)
    checks.append(jail_check)
    try:
        pair = jail_pair(cfg)
        if pair is None:
            mode = cfg.firecracker.jail.value
            checks.append(Check("jail", Status.WARN, f"off (mode {mode}): no jailer with a firecracker of its version"))
        else:
            who = f"uid {cfg.firecracker.jail_uid}" if cfg.firecracker.jail_uid else "a uid of its own per session"
            checks.append(Check("jail", Status.OK, f"on: {pair[0]} runs {pair[1]} as {who}"))
    except DispoError as e:
        checks.append(Check("jail", Status.FAIL, e.one_line()))
    try:
        check_kvm()
        checks.append(Check("/dev/kvm", Status.OK, "present, read/write"))
        kvm_ok = True
    except DispoError as e:
        checks.append(Check("/dev/kvm", Status.FAIL, e.one_line()))
        kvm_ok = False
    if not boot:
        checks.append(Check("boots a guest", Status.SKIP, "not tried (--no-boot)"))
    elif fc is None or not kvm_ok:
        checks.append(Check("boots a guest", Status.SKIP, "needs the firecracker binary and /dev/kvm"))
    elif os.uname().machine != "x86_64":
        checks.append(Check("boots a guest", Status.SKIP, "the probe guest is x86_64 code"))
    else:
        try:
            checks.append(probe_boot(cfg, fc))
        except DispoError as e:
            checks.append(Check("boots a guest", Status.FAIL, e.one_line()))
    return checks
