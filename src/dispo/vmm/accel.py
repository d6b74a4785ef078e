"""Which accelerator QEMU should use here, and the host TSC frequency a TCG guest needs.

/dev/kvm existing proves nothing (nested setups expose it and then fail on the first MSR write), so the
answer comes from trying once: boot the image's kernel under KVM with no root filesystem and see whether it
runs to its "cannot mount root" panic. The answer is cached per host boot and QEMU version, in memory and in
$DISPO_CACHE_DIR/accel.json; $DISPO_QEMU_ACCEL=kvm|tcg overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from enum import StrEnum
from pathlib import Path

from dispo.infra.proc import minimal_env, run

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QEMU_HINT = "install qemu-system-x86 (apt-get install qemu-system-x86)"
PROBE_TIMEOUT_S = 20.0
# Seen on the console once the kernel has run its whole boot and failed to find a root filesystem.
_PROBE_OK = ("Kernel panic", "VFS: Unable to mount root", "Please append a correct \"root=\"")


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


_memo: dict[str, Accel] = {}


def host_tsc_khz(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
                 cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host TSC frequency in kHz: sysfs when the kernel exports it, else the first 'cpu MHz' line."""
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def qemu_version(qemu: str = QEMU) -> str:
    out = run([qemu, "--version"], hint=QEMU_HINT).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def probe_kvm(kernel: Path, qemu: str = QEMU, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a real guest kernel runs under KVM here (boots to its no-root panic within `timeout`)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    # An aarch64 QEMU (on an arm64 host) probes with its virt machine and PL011 console.
    aarch64 = qemu.endswith("aarch64")
    machine, console_dev = ("virt,gic-version=max", "ttyAMA0") if aarch64 else ("microvm", "ttyS0")
    with tempfile.TemporaryDirectory(prefix="dispo-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [qemu, "-M", machine, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kernel),
                "-append", f"console={console_dev} panic=-1 root=/dev/dispo-probe-none",
                "-chardev", f"file,id=con0,path={console}", "-serial", "chardev:con0"]
        # Not processes.spawn_recorded: no session (no journal) exists yet, and the probe guest ends by itself
        # (its kernel panics at once: panic=-1 with -no-reboot) or is killed below within `timeout`.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=minimal_env())
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = console.read_text(errors="replace") if console.exists() else ""
                if any(s in text for s in _PROBE_OK):
                    return True
                if proc.poll() is not None:
                    text = console.read_text(errors="replace") if console.exists() else ""
                    return any(s in text for s in _PROBE_OK)
                time.sleep(0.05)
            return False
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def choose(kernel: Path, *, cache_file: Path | None = None, qemu: str = QEMU) -> Accel:
    """KVM if it actually runs a guest here, else TCG; probed once per host boot and QEMU version."""
    forced = os.environ.get("DISPO_QEMU_ACCEL", "")
    if forced:
        return Accel(forced)
    key = f"{_boot_id()} {qemu_version(qemu)}"
    if key in _memo:
        return _memo[key]
    if cache_file is None:
        from dispo.imagebuild import cache_dir

        # One file per QEMU binary: the x86_64 and the aarch64 one get their own answers.
        cache_file = cache_dir() / ("accel.json" if qemu == QEMU else f"accel-{Path(qemu).name}.json")
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            _memo[key] = Accel(cached["accel"])
            return _memo[key]
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.monotonic()
    accel = Accel.KVM if probe_kvm(kernel, qemu) else Accel.TCG
    log.info("accelerator probe: %s (%.1f s)", accel.value, time.monotonic() - t0)
    _memo[key] = accel
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "accel": accel.value, "probed": time.time()}) + "\n")
        os.replace(tmp, cache_file)
    except OSError as e:  # an unwritable cache costs one probe per process, nothing more
        log.debug("cannot cache the accelerator probe in %s: %s", cache_file, e)
    return accel
