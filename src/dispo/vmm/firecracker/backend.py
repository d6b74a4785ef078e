"""Build a FirecrackerVmm for a session from the config: which binary, jailed or not, which limits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dispo.config import Config, JailMode
from dispo.vmm.base import MachineSpec
from dispo.vmm.firecracker.api import Request
from dispo.vmm.firecracker.binaries import find_firecracker, jail_pair
from dispo.vmm.firecracker.jailer import JailSpec
from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm

log = logging.getLogger(__name__)

# Headroom over guest RAM for the VMM itself, its page cache when writing snapshots, and the API thread.
MEMORY_OVERHEAD_MIB = 256


def jail_base(spec: MachineSpec) -> Path:
    """Beside the session disk: the same filesystem (and btrfs subvolume), so the disk can be hard-linked
    into the chroot and the guest writes the session's own disk; not the state dir, since /run is usually
    mounted nodev and the jail needs device nodes. It goes with the session disk at the latest."""
    return spec.rootfs.parent / "jail"


def create(cfg: Config, spec: MachineSpec, *, on_request: Callable[[Request], None] | None = None,
           vsock_cid: int | None = None, track_dirty_pages: bool = False) -> FirecrackerVmm:
    pair = jail_pair(cfg)
    jail = None
    if pair is not None:
        jailer, binary = pair
        fc = cfg.firecracker
        jail = JailSpec(jailer=jailer, firecracker=binary, chroot_base=jail_base(spec), uid=fc.jail_uid or None,
                        gid=fc.jail_gid or None, memory_limit_mib=spec.memory_mib + MEMORY_OVERHEAD_MIB,
                        cpu_quota=float(spec.vcpus))
    else:
        binary = find_firecracker(cfg)
        if cfg.firecracker.jail is JailMode.AUTO:
            # No jailer of its version: never root all the same, but dispo's own sandbox (jailer.py).
            jail = JailSpec(jailer=Path(), firecracker=binary, chroot_base=jail_base(spec),
                            memory_limit_mib=spec.memory_mib + MEMORY_OVERHEAD_MIB, cpu_quota=float(spec.vcpus),
                            own=True)
            log.info("no jailer of the firecracker's version: firecracker runs in dispo's own sandbox")
    if vsock_cid is None and spec.extra.get("agent"):
        vsock_cid = 3  # the identity agent's channel; every guest has its own vsock, so the same CID is fine
    options = FirecrackerOptions(binary=binary, jail=jail, vsock_cid=vsock_cid, entropy=True,
                                 track_dirty_pages=track_dirty_pages, on_request=on_request)
    return FirecrackerVmm(spec, options)
