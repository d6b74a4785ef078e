"""Boot a session's guest: keys into the disk, network, VMM, and wait until SSH answers.

The piece a session drives without knowing the VMM behind it. Every host object is journaled by the layer
that makes it (network: dispo.net, VMM process: the backend); the VMM is also stopped in order (power off,
then signals) through the session's ExitStack, before the journal unwinds the network and the disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dispo import ssh
from dispo.errors import InvalidInput, NotFound, VmmError
from dispo.images import Image
from dispo.net.policy import NetworkPolicy
from dispo.session import Session
from dispo.vmm import qemu
from dispo.vmm.base import MachineSpec, NetAttachment, VmmKind
from dispo.vmm.firecracker.process import FirecrackerVmm

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Guest:
    vmm: qemu.QemuVmm | FirecrackerVmm
    keys: ssh.SessionKeys
    address: str
    boot_s: float      # VMM start to SSH ready
    ready_s: float     # session start (disk, keys, network, VMM) to SSH ready

    def ssh_argv(self, *, tty: bool = False) -> list[str]:
        return ssh.ssh_argv(self.keys, self.address, batch=not tty, tty=tty)


def choose_backend(requested: str | None, image: Image) -> VmmKind:
    """The backend asked for, else the first the image suits (QEMU for images that do not say)."""
    if requested and requested != "auto":
        try:
            kind = VmmKind(requested)
        except ValueError:
            raise InvalidInput(f"unknown backend {requested!r}", hint="use qemu or firecracker") from None
    else:
        kind = VmmKind(image.vmms[0]) if image.vmms else VmmKind.QEMU
    if image.vmms and kind.value not in image.vmms:
        raise InvalidInput(f"image {image.name!r} is not built for {kind.value} (it suits {', '.join(image.vmms)})",
                           hint=f"use --backend {image.vmms[0]} or an image built for {kind.value}")
    return kind


def kernel_for(image: Image, kind: VmmKind) -> Path | None:
    """Firecracker (x86_64) boots an uncompressed ELF vmlinux; QEMU the image's bzImage."""
    if kind is VmmKind.FIRECRACKER and image.vmlinux:
        return image.path / image.vmlinux
    return image.kernel_path


def boot(s: Session, *, backend: str | None = None, memory_mib: int = 512, vcpus: int = 1,
         ready_timeout: float = DEFAULT_READY_TIMEOUT_S, t0: float | None = None,
         policy: NetworkPolicy | None = None, cmdline: tuple[str, ...] = ()) -> Guest:
    """Boot s.image on s.disk and wait until its SSH answers. Raises VmmError (with the console tail).

    `policy` is what the guest may reach (default: the internet through NAT); `cmdline` adds kernel
    arguments for the guest's init (e.g. dispo.shm=MiB)."""
    from dispo.net import attach_network

    t0 = time.monotonic() if t0 is None else t0
    image = s.image
    if image is None:
        raise InvalidInput("the session has no image")
    kind = choose_backend(backend, image)
    kernel = kernel_for(image, kind)
    if kernel is None:
        raise InvalidInput(f"image {image.name!r} has no kernel, so it cannot boot",
                           hint="build a bootable image with 'dispo image build minimal'")
    for what, path in (("kernel", kernel), ("initrd", image.initrd_path)):
        if path is not None and not path.is_file():
            raise NotFound(f"image {image.name!r}: {what} file {path} is missing",
                           hint=f"rebuild the image ('dispo image build {image.name} --force')")
    keys = ssh.make_keys(s.state_path, s.session_id)
    ssh.install_keys(s.disk, keys)
    net = attach_network(s, policy)
    spec = MachineSpec(
        session_id=s.session_id, kernel=kernel, rootfs=s.disk, workdir=s.state_path,
        cmdline=(*image.cmdline, *net.kernel_args(), f"dispo.hostname=dispo-{s.session_id}", *cmdline),
        initrd=image.initrd_path, memory_mib=memory_mib, vcpus=vcpus, nets=(NetAttachment(net.tap, net.mac),))
    vmm: qemu.QemuVmm | FirecrackerVmm
    if kind is VmmKind.FIRECRACKER:
        from dispo.vmm.firecracker import backend as firecracker

        vmm = firecracker.create(s.cfg, spec)
    else:
        vmm = qemu.create(spec)
    vmm.check()
    s.stack.callback(vmm.stop)  # runs before the journal unwinds the network and the disk
    t_vmm = time.monotonic()
    vmm.start(s.journal)
    address = str(net.guest.ip)
    try:
        ssh.wait_ready(keys, address, timeout=ready_timeout, alive=vmm.running)
    except VmmError as e:
        if vmm.running():
            raise vmm.failure(e.message) from None
        raise vmm.failure(f"{e.message}: {kind.value} exited with status {vmm.wait_exit(0)}") from None
    ssh.save_info(s.state_path, keys, address)
    now = time.monotonic()
    guest = Guest(vmm, keys, address, now - t_vmm, now - t0)
    log.info("session %s: guest %s ready in %.1f s (%s, %s)", s.session_id, address, guest.ready_s,
             vmm.kind.value, vmm.accel.value)
    return guest
