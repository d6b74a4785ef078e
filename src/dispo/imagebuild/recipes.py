"""Image recipes: what goes into a built image: `minimal`, and the browsers `chromium` and `firefox`.

A recipe is data; `dispo.imagebuild.build` turns it into an mmdebstrap run, a root filesystem image and an
image carrying its kernel. The cache key covers everything here plus the guest files, so changing the
recipe or the guest init rebuilds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from dispo import arch as arches
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
    # Guest files (dispo.guest resources) installed at a path in the tree, executable.
    files: tuple[tuple[str, str], ...] = ()
    sshd_extra: str = ""                 # appended to the sshd settings (X11 forwarding for browsers)
    vmlinux: bool = False                # also store an ELF vmlinux (Firecracker boots only those)
    # Guest configuration files (dispo.guest resources) installed at a path in the tree, mode 0644: the quiet
    # browser's policies and preferences (docs/quiet.md).
    configs: tuple[tuple[str, str], ...] = ()
    # Kernel module directories (under /lib/modules/VERSION/) deleted from the tree: hardware no guest has.
    prune_modules: tuple[str, ...] = ()

    def key(self, sources_text: str) -> str:
        h = hashlib.sha256()
        fields = asdict(self)
        # Fields added later hash only when set, so a recipe that does not use them keeps its cached build.
        for late in ("files", "sshd_extra", "vmlinux", "configs", "prune_modules"):
            if not fields[late]:
                del fields[late]
        h.update(json.dumps(fields, sort_keys=True).encode())
        h.update(sources_text.encode())
        h.update(guest.init_script())
        h.update(guest.SSHD_CONFIG.encode())
        for _, resource in (*self.files, *self.configs):
            h.update(guest.resource(resource))
        return h.hexdigest()[:16]

    @property
    def stem(self) -> str:
        """The build cache's name for this recipe: `minimal` on amd64 (as before), `minimal-arm64` elsewhere."""
        return self.name if self.arch == "amd64" else f"{self.name}-{self.arch}"

    def for_arch(self, arch: str) -> Recipe:
        """This recipe for Debian architecture `arch` (amd64 is the recipe as written)."""
        a = arches.get(arch)
        if a.debian == self.arch:
            return self
        if a is not arches.ARM64 or self.arch != "amd64":
            raise NotFound(f"recipe {self.name!r} has no {a.debian} variant", hint="use --arch amd64 or arm64")
        packages = tuple(a.kernel_package if p == arches.AMD64.kernel_package else p for p in self.packages)
        # QEMU's virt machine (and Firecracker on aarch64) describe their virtio-mmio devices in the device
        # tree; Debian's generic arm64 kernel has the transports, the devices, ext4 and the power key
        # (gpio-keys, what QEMU's system_powerdown presses on virt) as modules, so the initrd loads them all.
        return replace(self, arch=a.debian, packages=packages, initrd_modules=ARM64_INITRD_MODULES,
                       # QEMU virt's PL011 UART; Firecracker on aarch64 has an 8250 (ttyS0): its backend
                       # swaps the console argument (vmm/firecracker/process.py).
                       cmdline=tuple("console=ttyAMA0" if c == "console=ttyS0" else c for c in self.cmdline),
                       # No ELF vmlinux: both VMMs boot arm64's uncompressed Image (imagebuild/__init__.py), so
                       # every arm64 image suits Firecracker too (on an arm64 host).
                       vmlinux=False, vmms=tuple(dict.fromkeys((*self.vmms, "firecracker"))),
                       prune_modules=ARM64_PRUNE_MODULES)

    def app_packages(self) -> tuple[str, ...]:
        """What `--from` installs into an image that already boots: the recipe's packages beyond minimal's
        (kernel, initramfs, sshd and the rest come with the source image)."""
        return tuple(p for p in self.packages if p not in MINIMAL.for_arch(self.arch).packages)


MINIMAL = Recipe(
    name="minimal",
    suite="bookworm",
    arch="amd64",
    packages=("linux-image-cloud-amd64", "initramfs-tools", "kmod", "openssh-server", "iproute2",
              "ca-certificates", "curl"),
    # virtio_console: the guest agent's channel (a virtio-serial port). Loaded by the initrd it adds nothing
    # measurable to a cold boot; loaded by the agent from the root disk while the init ran, it added 1 to 3 s
    # under TCG (bench/cold.py).
    initrd_modules=("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console"),
    cmdline=("console=ttyS0", "root=/dev/vda", "rw", f"init={guest.INIT_PATH}", "panic=-1"),
    vmms=("qemu",),
    headroom_mib=512,
    files=((guest.AGENT_PATH, "agent.pl"),),
)

ARM64_INITRD_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
                        "vmw_vsock_virtio_transport", "ext4", "gpio_keys")

# The generic arm64 kernel's modules are ~300 MB, mostly drivers for hardware no VM guest has (QEMU virt and
# Firecracker give virtio devices only): gone from the tree, about 190 MB less per image. The initrd is made
# before (it keeps what it lists); sound and networking stay.
ARM64_PRUNE_MODULES = ("kernel/drivers/gpu", "kernel/drivers/media", "kernel/drivers/net/wireless",
                       "kernel/drivers/net/ethernet", "kernel/drivers/infiniband", "kernel/drivers/iio",
                       "kernel/drivers/staging", "kernel/drivers/usb", "kernel/drivers/scsi", "kernel/drivers/ata",
                       "kernel/drivers/hwmon", "kernel/drivers/bluetooth", "kernel/net/wireless", "kernel/net/mac80211",
                       "kernel/net/bluetooth")

# What both display modes need: TigerVNC's Xvnc and a window manager for `web`, xauth for sshd's X11
# forwarding (`x11`), fonts for any page at all. Debian's packages only; no Recommends (mmdebstrap's default).
# tzdata: the guest's clock shows the host's time zone (docs/quiet.md).
# xclip: the session's clipboard through the API; pulseaudio: the session's sound (a null sink the host reads);
# xdotool: x11 mode's "[dispo ID]" window titles.
_DISPLAY = ("tigervnc-standalone-server", "matchbox-window-manager", "xauth", "fonts-dejavu-core",
            "fonts-liberation2", "tzdata", "xclip", "pulseaudio", "xdotool")

# The quiet browser (docs/quiet.md): each browser's enterprise policies and system preferences, in the image.
_QUIET = {
    "chromium": (("/etc/chromium/policies/managed/dispo-quiet.json", "chromium-policies.json"),
                 ("/etc/chromium.d/dispo-quiet", "chromium-flags.sh"),
                 ("/usr/lib/dispo/chromium-initial-preferences.json", "chromium-initial-preferences.json")),
    "firefox": (("/usr/share/firefox-esr/distribution/policies.json", "firefox-policies.json"),
                ("/etc/firefox-esr/dispo-quiet.js", "firefox-prefs.js")),
}


def _browser(name: str, package: str) -> Recipe:
    return replace(
        MINIMAL, name=name, packages=(*MINIMAL.packages, *_DISPLAY, package), vmms=("qemu", "firecracker"),
        # A browser's cache, profile and crash dumps land on the session's disk.
        headroom_mib=1024,
        files=(*MINIMAL.files, (guest.APP_PATH, "app.sh"), (guest.OPEN_PATH, "open.pl"),
               (guest.SETUP_PATH, "browser-setup.sh"), (guest.FILES_PATH, "files.sh")),
        configs=_QUIET[name],
        # Untrusted forwarding on the host side (ssh -X); xauth in the guest makes the cookie.
        sshd_extra="X11Forwarding yes\nX11UseLocalhost yes\n",
        vmlinux=True)


CHROMIUM = _browser("chromium", "chromium")
FIREFOX = _browser("firefox", "firefox-esr")

RECIPES = {r.name: r for r in (MINIMAL, CHROMIUM, FIREFOX)}


def get(name: str, arch: str = "amd64") -> Recipe:
    try:
        return RECIPES[name].for_arch(arch)
    except KeyError:
        raise NotFound(f"no image recipe named {name!r}",
                       hint=f"known recipes: {', '.join(sorted(RECIPES))}") from None
