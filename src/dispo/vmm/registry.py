"""VmmKind -> a backend for a MachineSpec; which backend an image suits; which kernel file it boots.

The one place that names concrete backends: the runtime asks `create(cfg, kind, spec)` for a `Vmm`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from dispo import arch as arches
from dispo.config import Config
from dispo.errors import Conflict, DispoError, InvalidInput, NotFound
from dispo.storage.images import Image
from dispo.vmm.base import MachineSpec, Vmm, VmmKind


def choose_backend(requested: str | None, image: Image) -> VmmKind:
    """The backend asked for, else the first the image suits (QEMU for images that do not say)."""
    if requested and requested != "auto":
        try:
            kind = VmmKind(requested)
        except ValueError:
            raise InvalidInput(f"unknown backend {requested!r}", hint="use qemu or firecracker") from None
    else:
        kind = VmmKind(image.vmms[0]) if image.vmms else VmmKind.QEMU
    if image.vmms and kind.value not in image.vmms:  # a fine request this image cannot serve: 409, not 400
        raise Conflict(f"image {image.name!r} is not built for {kind.value} (it suits {', '.join(image.vmms)})",
                       hint=f"use --backend {image.vmms[0]} or an image built for {kind.value}")
    check_arch(image, kind)
    return kind


def check_arch(image: Image, kind: VmmKind) -> None:
    """Can `kind` run `image`'s architecture on this host? One line saying what is missing, before anything
    exists: Firecracker runs only the host's own architecture (KVM, no emulation); QEMU runs any, under TCG
    when it is not the host's, with the QEMU binary for it."""
    try:
        guest = arches.get(image.arch)
    except InvalidInput:
        raise InvalidInput(f"image {image.name!r} is for {image.arch}, which dispo cannot run",
                           hint="use an x86_64 or aarch64 image") from None
    host = arches.host()
    if kind is VmmKind.FIRECRACKER and guest != host:
        other = ("" if "qemu" not in image.vmms else
                 "; run it under QEMU's emulation with --backend qemu")
        raise InvalidInput(f"image {image.name!r} is for {guest.machine}: Firecracker runs only guests of the "
                           f"host's architecture ({host.machine}){other}",
                           hint=f"use an image built for {host.machine} ('dispo image build RECIPE --arch "
                                f"{host.debian}'), or run this one on an {guest.machine} host")
    if kind is VmmKind.QEMU and arches.qemu_for(guest) is None:
        how = "" if guest == host else " (under TCG emulation on this host)"
        raise NotFound(f"image {image.name!r} is for {guest.machine}: running it needs {guest.qemu_system}{how}, "
                       f"which is not installed",
                       hint=f"apt-get install {guest.qemu_package}")


def kernel_for(image: Image, kind: VmmKind) -> Path | None:
    """Firecracker (x86_64) boots an uncompressed ELF vmlinux; QEMU the image's bzImage."""
    if kind is VmmKind.FIRECRACKER and image.vmlinux:
        return image.path / image.vmlinux
    return image.kernel_path


def create(cfg: Config, kind: VmmKind, spec: MachineSpec) -> Vmm:
    if kind is VmmKind.FIRECRACKER:
        from dispo.vmm.firecracker import backend as firecracker

        return firecracker.create(cfg, spec)
    from dispo.vmm import qemu

    return qemu.create(spec)


def vmm_version(cfg: Config, kind: VmmKind) -> str:
    """The version of the VMM binary sessions of `kind` would run ("" when none is found): a template's state
    is only loaded by the version that saved it (storage/templates.py)."""
    try:
        if kind is VmmKind.FIRECRACKER:
            from dispo.vmm.firecracker.binaries import find_firecracker, jail_pair

            pair = jail_pair(cfg)
            binary = pair[1] if pair else find_firecracker(cfg)
        else:
            from dispo.infra.proc import which
            from dispo.vmm.accel import QEMU

            binary = Path(which(QEMU))
        st = binary.stat()
    except (OSError, DispoError):
        return ""
    return _version(kind, str(binary), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _version(kind: VmmKind, binary: str, mtime_ns: int, size: int) -> str:
    from dispo.infra.proc import run

    proc = run([binary, "--version"], check=False, timeout=10)
    first = (proc.stdout or proc.stderr or "").strip().splitlines()
    return f"{kind.value} {first[0].strip()}" if first else ""
