"""Host and guest architectures: their names, and what this host can build and run.

Two spellings meet here: Debian's (`amd64`, `arm64`: recipes, mmdebstrap, `--arch`) and the kernel's
(`x86_64`, `aarch64`: `uname -m`, image.json's `arch`, Firecracker's CI bucket). Every other module asks
this one.

What runs where:
- a guest of the host's own architecture: QEMU (KVM when it works, else TCG) and Firecracker (KVM only);
- a guest of another architecture: QEMU under TCG emulation only (`qemu-system-aarch64`, `-M virt`);
  Firecracker never emulates;
- building an image of another architecture: mmdebstrap runs the guest's maintainer scripts through
  qemu-user (`qemu-user-static` registered in binfmt_misc).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dispo.errors import InvalidInput, NotFound, PermissionProblem
from dispo.infra.proc import run

log = logging.getLogger(__name__)

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


@dataclass(frozen=True)
class Arch:
    debian: str             # amd64, arm64
    machine: str            # uname -m, image.json: x86_64, aarch64
    qemu_system: str        # the QEMU that runs a guest of this architecture
    qemu_package: str       # the Debian package that has it
    qemu_user: str          # the binfmt_misc entry (qemu-user-static) that runs its binaries elsewhere
    kernel_package: str     # Debian's kernel for a VM guest of this architecture


AMD64 = Arch("amd64", "x86_64", "qemu-system-x86_64", "qemu-system-x86", "qemu-x86_64", "linux-image-cloud-amd64")
# Debian has no cloud kernel for arm64: the generic one, with its virtio drivers as modules (recipes.py).
ARM64 = Arch("arm64", "aarch64", "qemu-system-aarch64", "qemu-system-arm", "qemu-aarch64", "linux-image-arm64")
ARCHES = (AMD64, ARM64)


def get(name: str) -> Arch:
    """An architecture by either spelling (amd64/x86_64, arm64/aarch64)."""
    for a in ARCHES:
        if name in (a.debian, a.machine):
            return a
    raise InvalidInput(f"unknown architecture {name!r}",
                       hint="use amd64 (x86_64) or arm64 (aarch64)")


def host() -> Arch:
    machine = os.uname().machine
    try:
        return get(machine)
    except InvalidInput:
        raise InvalidInput(f"dispo does not support this host's architecture ({machine})",
                           hint="run dispo on an x86_64 or aarch64 host") from None


def binfmt_entry(a: Arch, binfmt_dir: Path = BINFMT_DIR) -> bool:
    """Whether binaries of `a` run here through an enabled qemu-user binfmt_misc entry."""
    entry = binfmt_dir / a.qemu_user
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def ensure_foreign_exec(a: Arch, binfmt_dir: Path = BINFMT_DIR) -> str:
    """Make sure programs of architecture `a` run on this host (for mmdebstrap's maintainer scripts): nothing
    to do for the host's own; else qemu-user-static through binfmt_misc, mounted and enabled if it is not (a
    build runs as root anyway). Returns what was done; raises with what is missing and how to get it."""
    if a == host():
        return ""
    if binfmt_entry(a, binfmt_dir):
        return f"{a.debian} programs run through {a.qemu_user} (binfmt_misc)"
    hint = ("apt-get install qemu-user-static binfmt-support, then "
            f"'mount -t binfmt_misc binfmt_misc {binfmt_dir}; update-binfmts --enable {a.qemu_user}'")
    if not Path(f"/usr/bin/{a.qemu_user}-static").exists() and shutil.which(f"{a.qemu_user}-static") is None:
        raise NotFound(f"building an {a.debian} image on this {host().debian} host needs {a.qemu_user}-static "
                       f"(qemu-user emulation), which is not installed", hint=hint)
    if os.geteuid() != 0:
        raise PermissionProblem(f"{a.debian} programs cannot run here: {a.qemu_user} is not enabled in binfmt_misc",
                                hint=hint)
    did = []
    if not (binfmt_dir / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt_dir], hint=hint)
        did.append(f"mounted {binfmt_dir}")
    if not binfmt_entry(a, binfmt_dir):
        run(["update-binfmts", "--enable", a.qemu_user], hint=hint)
        did.append(f"enabled {a.qemu_user}")
    if not binfmt_entry(a, binfmt_dir):
        raise NotFound(f"{a.debian} programs still cannot run here: no enabled {a.qemu_user} entry in {binfmt_dir}",
                       hint=hint)
    log.info("foreign architecture %s: %s", a.debian, ", ".join(did))
    return ", ".join(did)


def qemu_for(a: Arch) -> str | None:
    """The path of the QEMU that runs `a` guests, None when it is not installed."""
    return shutil.which(a.qemu_system)


def runnable(a: Arch) -> dict[str, str]:
    """For `dispo doctor` and the README's table: backend -> how a guest of `a` runs here ("" = it does not)."""
    h = host()
    out: dict[str, str] = {}
    qemu = qemu_for(a)
    if qemu is None:
        out["qemu"] = ""
    elif a == h:
        out["qemu"] = "KVM when it works here, else TCG"
    else:
        out["qemu"] = "TCG emulation only"
    out["firecracker"] = "KVM" if a == h else ""
    return out
