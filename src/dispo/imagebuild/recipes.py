"""Image recipes: what goes into a built image. Only `minimal` for now.

A recipe is data; `dispo.imagebuild.build` turns it into an mmdebstrap run, a root filesystem image and an
image carrying its kernel. The cache key covers everything here plus the guest files, so changing the
recipe or the guest init rebuilds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from dispo import guest
from dispo.errors import NotFound


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str
    arch: str                            # Debian architecture
    packages: tuple[str, ...]
    # Loaded by the initrd (MODULES=list): the cloud kernel has its virtio drivers as modules, and QEMU's
    # microvm describes its virtio-mmio devices in ACPI, which virtio_mmio finds without kernel arguments.
    initrd_modules: tuple[str, ...]
    cmdline: tuple[str, ...]             # kernel arguments every boot of this image needs
    vmms: tuple[str, ...]
    headroom_mib: int                    # free space in the root filesystem for the session's writes

    def key(self, sources_text: str) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(sources_text.encode())
        h.update(guest.init_script())
        h.update(guest.SSHD_CONFIG.encode())
        return h.hexdigest()[:16]


MINIMAL = Recipe(
    name="minimal",
    suite="bookworm",
    arch="amd64",
    packages=("linux-image-cloud-amd64", "initramfs-tools", "kmod", "openssh-server", "iproute2",
              "ca-certificates", "curl"),
    initrd_modules=("virtio_mmio", "virtio_blk", "virtio_net"),
    cmdline=("console=ttyS0", "root=/dev/vda", "rw", f"init={guest.INIT_PATH}", "panic=-1"),
    vmms=("qemu",),
    headroom_mib=512,
)

RECIPES = {r.name: r for r in (MINIMAL,)}


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise NotFound(f"no image recipe named {name!r}",
                       hint=f"known recipes: {', '.join(sorted(RECIPES))}") from None
