"""arm64 without a guest: recipes, the kernel's forms, QEMU's aarch64 command line, the architecture checks
before launch, Firecracker's aarch64 machine and boot configuration (checked against the OpenAPI spec, since
no arm64 host is here) and `dispo image fetch --arch aarch64` against a local server laid out like the bucket.
The real aarch64 guest runs in tests/test_arm64_e2e.py."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dispo import arch as arches
from dispo import kernels
from dispo.config import Config, StorageBackend
from dispo.errors import InvalidInput, NotFound
from dispo.fetch import fetch_image, resolve
from dispo.imagebuild import recipes
from dispo.storage.images import Image
from dispo.vmm import qemu, registry
from dispo.vmm.accel import Accel
from dispo.vmm.base import MachineSpec, NetAttachment, VmmKind
from dispo.vmm.firecracker import process as fc
from dispo.vmm.firecracker.api import FirecrackerApi, Request
from dispo.vmm.firecracker.probe import tiny_elf
from tests.fcworld import Contract
from tests.s3world import Bucket, serve
from tests.worlds import make_config, sh

SID = "a4c0ffee"


def arm64_image_bytes(size: int = 1 << 16) -> bytes:
    """An arm64 Image header (Documentation/arch/arm64/booting.rst) and padding: what the format checks look
    at. It stands in for a real kernel only where none is booted (the E2E test boots Debian's)."""
    head = bytearray(64)
    head[0:4] = b"MZ\x00\x91"                  # code0: the EFI stub's "MZ" (a real Image starts so)
    head[0x08:0x10] = (0).to_bytes(8, "little")  # text_offset
    head[0x10:0x18] = size.to_bytes(8, "little")  # image_size
    head[0x38:0x3C] = b"ARM\x64"
    return bytes(head) + bytes(size - 64)


# -- recipes ----------------------------------------------------------------------------------------------
def test_amd64_recipes_are_unchanged_and_arm64_ones_differ_where_they_must() -> None:
    for name, r in recipes.RECIPES.items():
        assert r.for_arch("amd64") is r and recipes.get(name) is r and r.stem == name
        a = recipes.get(name, "arm64")
        assert recipes.get(name, "aarch64") == a
        assert a.arch == "arm64" and a.stem == f"{name}-arm64" and a.key("x") != r.key("x")
        assert "linux-image-arm64" in a.packages and "linux-image-cloud-amd64" not in a.packages
        assert {"virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "ext4", "gpio_keys"} <= set(
            a.initrd_modules)
        assert "console=ttyAMA0" in a.cmdline and "console=ttyS0" not in a.cmdline
        assert not a.vmlinux and "firecracker" in a.vmms and "qemu" in a.vmms
        # --from installs only the app: never a second kernel.
        assert not any(p.startswith("linux-image") for p in a.app_packages())
    with pytest.raises(InvalidInput, match="unknown architecture"):
        recipes.get("minimal", "riscv64")


def test_foreign_builds_say_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No qemu-user binfmt entry and no qemu-aarch64-static: one line naming the package."""
    assert arches.ensure_foreign_exec(arches.host(), tmp_path) == ""
    other = next(a for a in arches.ARCHES if a != arches.host())
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(arches, "Path", lambda p: tmp_path / "nope" if str(p).startswith("/usr/bin/") else Path(p))
    with pytest.raises(NotFound) as e:
        arches.ensure_foreign_exec(other, tmp_path)
    assert "qemu-user-static" in e.value.one_line() and f"{other.qemu_user}-static" in e.value.one_line()
    (tmp_path / other.qemu_user).write_text("enabled\ninterpreter /x\n")
    assert "binfmt_misc" in arches.ensure_foreign_exec(other, tmp_path)


# -- the kernel's forms ---------------------------------------------------------------------------------------
def test_arm64_image_is_unpacked_checked_and_capped(tmp_path: Path) -> None:
    image = arm64_image_bytes()
    gz = tmp_path / "vmlinuz"
    gz.write_bytes(gzip.compress(image))
    assert kernels.kernel_arch(gz) == "aarch64"
    assert kernels.arm64_image(gz, tmp_path / "Image") == len(image)
    assert (tmp_path / "Image").read_bytes() == image and kernels.kernel_arch(tmp_path / "Image") == "aarch64"
    kernels.check_arm64_image(tmp_path / "Image")
    with pytest.raises(InvalidInput, match="more than"):
        kernels.arm64_image(gz, tmp_path / "big", max_size=1 << 12)
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big*"))
    elf = tiny_elf(tmp_path / "vmlinux")
    assert kernels.kernel_arch(elf) == "x86_64"
    with pytest.raises(InvalidInput, match="not an arm64 Image"):
        kernels.arm64_image(elf, tmp_path / "x")
    with pytest.raises(InvalidInput, match="uncompressed arm64 Image"):
        kernels.check_arm64_image(gz)
    bz = tmp_path / "bzImage"
    bz.write_bytes(bytes(0x202) + b"HdrS" + bytes(512))
    assert kernels.kernel_arch(bz) == "x86_64" and kernels.kernel_arch(tmp_path / "none") is None


# -- QEMU -----------------------------------------------------------------------------------------------------
def arm_spec(tmp_path: Path, **kw: object) -> MachineSpec:
    (tmp_path / "Image").write_bytes(arm64_image_bytes())
    base: dict[str, object] = dict(session_id=SID, kernel=tmp_path / "Image", rootfs=tmp_path / "disk.ext4",
                                   workdir=tmp_path, cmdline=("console=ttyAMA0", "root=/dev/vda"),
                                   initrd=tmp_path / "initrd.img",
                                   nets=(NetAttachment("dsp-a4c0ffee", "06:00:ac:14:00:02"),))
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def test_an_aarch64_guest_is_a_virt_machine_under_tcg_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPO_QEMU_ACCEL", "kvm")  # even when forced: KVM cannot run another architecture
    vmm = qemu.create(arm_spec(tmp_path))
    if arches.host() is arches.ARM64:
        pytest.skip("an arm64 host runs aarch64 guests natively")
    assert vmm.guest is arches.ARM64 and vmm.accel is Accel.TCG
    argv = vmm.argv(qemu.LaunchFds(kernel=10, initrd=11, disk_rw=12, disk_ro=13, qmp=14, agent=15, taps=(16,)))
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-M") + 1] == "virt,gic-version=max"
    assert argv[argv.index("-cpu") + 1] == qemu.TCG_AARCH64_CPU and argv[argv.index("-accel") + 1] == "tcg"
    append = argv[argv.index("-append") + 1]
    assert "console=ttyAMA0" in append and "tsc_early_khz" not in append  # an x86 TSC argument only
    # The same virtio-mmio devices as on microvm: virt lists them in its device tree.
    assert {"virtio-blk-device,drive=root", "virtio-net-device,netdev=n0,mac=06:00:ac:14:00:02",
            "virtio-serial-device,max_ports=2"} <= set(argv)
    kvm = qemu.QemuVmm(arm_spec(tmp_path), Accel.KVM, arches.ARM64)
    kargv = kvm.argv(qemu.LaunchFds(kernel=10, initrd=None, disk_rw=12, disk_ro=13, qmp=14, agent=15, taps=(16,)))
    assert kargv[kargv.index("-cpu") + 1] == "host"  # an arm64 host with working KVM


def test_an_x86_64_guest_is_still_a_microvm(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(bytes(0x202) + b"HdrS" + bytes(512))
    vmm = qemu.create(arm_spec(tmp_path, kernel=tmp_path / "vmlinuz"), Accel.TCG)
    argv = vmm.argv(qemu.LaunchFds(kernel=10, initrd=None, disk_rw=12, disk_ro=13, qmp=14, agent=15, taps=(16,)))
    assert vmm.guest is arches.AMD64 and argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-M") + 1] == "microvm,rtc=on"


# -- the architecture check before anything exists ---------------------------------------------------------
def image(tmp_path: Path, arch: str, vmms: tuple[str, ...]) -> Image:
    return Image(name="img", path=tmp_path, size=1, sha256="0", storage=StorageBackend.COPY, created=0.0,
                 source="", kernel="Image", arch=arch, vmms=vmms)


def test_an_image_its_vmm_cannot_run_here_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host, other = arches.host(), next(a for a in arches.ARCHES if a != arches.host())
    foreign = image(tmp_path, other.machine, ("qemu", "firecracker"))
    assert registry.choose_backend(None, foreign) is VmmKind.QEMU  # its QEMU is installed here
    with pytest.raises(InvalidInput) as e:
        registry.choose_backend("firecracker", foreign)
    line = e.value.one_line()
    assert f"is for {other.machine}" in line and "--backend qemu" in line and host.machine in line
    monkeypatch.setattr(arches, "qemu_for", lambda a: None)
    with pytest.raises(NotFound) as nf:
        registry.choose_backend(None, foreign)
    assert other.qemu_system in nf.value.one_line() and f"apt-get install {other.qemu_package}" in nf.value.one_line()
    with pytest.raises(InvalidInput, match="cannot run"):
        registry.choose_backend(None, image(tmp_path, "riscv64", ("qemu",)))


# -- Firecracker on aarch64 (by the spec: no arm64 host here) ------------------------------------------------
class Recorder:
    """Stands in for the Firecracker server (none for aarch64 here): records requests, answers 204."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, json={"state": "Running"}) if request.method == "GET" else httpx.Response(204)


def test_firecracker_boot_args_on_aarch64() -> None:
    amd = ("console=ttyS0", "reboot=k", "panic=1", "pci=off", "root=/dev/vda")
    assert fc.boot_args(amd, "x86_64") == amd
    arm = fc.boot_args(("console=ttyAMA0", "root=/dev/vda", "rw", "panic=-1"), "aarch64")
    assert arm == (fc.AARCH64_EARLYCON, "console=ttyS0", "root=/dev/vda", "rw", "panic=-1")
    assert fc.boot_args(amd, "aarch64") == (fc.AARCH64_EARLYCON, "console=ttyS0", "panic=1", "pci=off",
                                            "root=/dev/vda")
    assert not fc.can_send_ctrl_alt_del("aarch64") and fc.can_send_ctrl_alt_del("x86_64")


def test_firecracker_aarch64_configuration_matches_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fc, "_arch", lambda: "aarch64")
    contract, seen, rec = Contract(), [], Recorder()

    def hook(req: Request) -> None:
        seen.append(req)
        contract.check(req)

    spec = arm_spec(tmp_path, cmdline=("console=ttyAMA0", "root=/dev/vda", "rw"), memory_mib=1024, vcpus=2)
    (tmp_path / "disk.ext4").write_bytes(b"")
    (tmp_path / "initrd.img").write_bytes(b"")
    vmm = fc.FirecrackerVmm(spec, fc.FirecrackerOptions(binary=Path("/bin/true"), entropy=True))
    vmm.api = FirecrackerApi(Path("/nonexistent.sock"), on_request=hook, transport=httpx.MockTransport(rec))
    monkeypatch.setattr(fc, "check_kvm", lambda: None)  # check() on an arm64 host; no KVM question here
    vmm.check()  # an uncompressed arm64 Image passes
    vmm._configure()
    boot = next(r for r in seen if r.operation == "putGuestBootSource")
    assert boot.body is not None and boot.body["kernel_image_path"] == str(tmp_path / "Image")
    assert boot.body["boot_args"] == f"{fc.AARCH64_EARLYCON} console=ttyS0 root=/dev/vda rw"
    assert {r.operation for r in seen} >= {"putMachineConfiguration", "putGuestDriveByID",
                                          "putGuestNetworkInterfaceByID", "putEntropyDevice"}
    # The ELF vmlinux an x86_64 host boots is refused on aarch64, in one line, before anything exists.
    spec_elf = dataclasses.replace(spec, kernel=tiny_elf(tmp_path / "vmlinux"))
    with pytest.raises(InvalidInput, match="uncompressed arm64 Image"):
        fc.FirecrackerVmm(spec_elf, fc.FirecrackerOptions(binary=Path("/bin/true"))).check()


def test_firecracker_aarch64_stop_sends_no_ctrl_alt_del(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No i8042 on aarch64: stop goes straight to SIGTERM; on x86_64 it presses Ctrl-Alt-Del first (a real
    process stands in for firecracker, a recorder for its API)."""
    from dispo.infra import processes

    for machine, pressed in (("aarch64", False), ("x86_64", True)):
        monkeypatch.setattr(fc, "_arch", lambda m=machine: m)
        rec = Recorder()
        vmm = fc.FirecrackerVmm(arm_spec(tmp_path), fc.FirecrackerOptions(binary=Path("/bin/true"),
                                                                          shutdown_grace=0.2))
        vmm.api = FirecrackerApi(Path("/nonexistent.sock"), transport=httpx.MockTransport(rec))
        proc = subprocess.Popen(["sleep", "60"])
        vmm._proc, vmm._started = proc, True
        vmm._starttime = processes.starttime(proc.pid) or ""
        vmm.stop(timeout=4)
        assert not processes.is_same_process(proc.pid, vmm._starttime)
        assert bool([r for r in rec.requests if r.url.path == "/actions"]) is pressed, machine


# -- dispo image fetch --arch aarch64 ------------------------------------------------------------------------
CI = "firecracker-ci"


@pytest.fixture
def bucket(tmp_path: Path) -> Bucket:
    if shutil.which("mksquashfs") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs squashfs-tools and openssh-client")
    root = tmp_path / "bucket"

    def put(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    tree = tmp_path / "tree"
    (tree / "root").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("ubuntu-arm\n")
    sh("mksquashfs", tree, tmp_path / "r.squashfs", "-quiet", "-noappend", "-comp", "gzip")
    squash = (tmp_path / "r.squashfs").read_bytes()
    # The bucket's aarch64 layout: the kernel keeps the name vmlinux-* but is an arm64 Image.
    for folder in ("v1.13", "20250612-1a2b3c4"):
        put(f"{CI}/{folder}/aarch64/vmlinux-6.1.141", arm64_image_bytes())
        put(f"{CI}/{folder}/aarch64/vmlinux-6.1.99", arm64_image_bytes())
        put(f"{CI}/{folder}/aarch64/ubuntu-24.04.squashfs", squash)
        put(f"{CI}/{folder}/x86_64/vmlinux-6.1.141", tiny_elf(tmp_path / "k.elf").read_bytes())
        put(f"{CI}/{folder}/x86_64/ubuntu-24.04.squashfs", squash)
    # Newest folder with an x86_64 ELF where the aarch64 Image should be: refused, not imported.
    put(f"{CI}/20251101-ffffff/aarch64/vmlinux-6.1.141", tiny_elf(tmp_path / "k2.elf").read_bytes())
    put(f"{CI}/20251101-ffffff/aarch64/ubuntu-24.04.squashfs", squash)
    return Bucket(root)


@pytest.fixture
def base(bucket: Bucket) -> Iterator[str]:
    with serve(bucket) as url:
        yield url


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path / "ws", tmp_path / "state", StorageBackend.COPY)


def test_fetch_aarch64_takes_the_aarch64_folder_and_records_the_arch(cfg: Config, base: str) -> None:
    with httpx.Client() as client:
        art = resolve(client, base, "aarch64", "20250612-1a2b3c4")
    assert art.kernel == f"{CI}/20250612-1a2b3c4/aarch64/vmlinux-6.1.141" and art.squashfs
    img = fetch_image(cfg, "fc-arm", base=base, arch="arm64", folder="20250612-1a2b3c4", quiet=True)
    assert img.arch == "aarch64" and img.vmms == ("firecracker",)
    assert (img.path / "vmlinux").read_bytes()[0x38:0x3C] == b"ARM\x64"
    meta = json.loads((img.path / "image.json").read_text())
    assert meta["upstream"]["kernel"].endswith("/aarch64/vmlinux-6.1.141")
    # Here (x86_64) Firecracker cannot run it: one line, before any session exists.
    if arches.host() is not arches.ARM64:
        with pytest.raises(InvalidInput, match="Firecracker runs only guests of the host's architecture"):
            registry.choose_backend(None, img)


def test_fetch_aarch64_refuses_a_kernel_that_is_no_arm64_image(cfg: Config, base: str) -> None:
    with pytest.raises(InvalidInput, match="uncompressed arm64 Image"):
        fetch_image(cfg, "fc-bad", base=base, arch="aarch64", quiet=True)  # the newest folder: an x86 ELF
    assert not (cfg.images_dir / "fc-bad").exists()
    assert not [p for p in cfg.workspace.iterdir() if p.name.startswith(".fetch-")]


def test_cli_image_fetch_arch_aarch64(cfg: Config, base: str, tmp_path: Path) -> None:
    env = {**os.environ, "DISPO_WORKSPACE": str(cfg.workspace), "DISPO_STATE_DIR": str(cfg.state_dir)}
    p = subprocess.run([sys.executable, "-m", "dispo", "image", "fetch", "--name", "fc-arm", "--arch", "aarch64",
                        "--ci-version", "v1.13", "--url", base, "--quiet"],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("fetched fc-arm: v1.13 vmlinux-6.1.141 + ubuntu-24.04.squashfs"), p.stdout
    ls = subprocess.run([sys.executable, "-m", "dispo", "image", "ls"], env=env, capture_output=True, text=True,
                        timeout=60, check=False)
    assert "fc-arm" in ls.stdout and "aarch64" in ls.stdout, ls.stdout


def test_doctor_names_the_host_and_what_runs_each_architecture() -> None:
    from dispo.vmm.firecracker.doctor import arch_checks

    checks = {c.name: c for c in arch_checks()}
    host = arches.host()
    assert host.machine in checks["host"].detail and host.debian in checks["host"].detail
    own = checks[f"{host.machine} guests"].detail
    assert "firecracker (KVM)" in own and "builds natively" in own
    other = next(a for a in arches.ARCHES if a != host)
    foreign = checks[f"{other.machine} guests"].detail
    assert "Firecracker never emulates" in foreign
    assert ("qemu (TCG emulation only)" in foreign) == (shutil.which(other.qemu_system) is not None)


def test_a_build_replaces_only_its_own_architectures_older_builds(tmp_path: Path) -> None:
    from dispo.imagebuild import older_builds

    for n in ("minimal-0123456789abcdef", "minimal-fedcba9876543210", "minimal-arm64-0123456789abcdef",
              "minimal-arm64-1111111111111111", ".build-1a2b3c4d-minimal", "chromium-0123456789abcdef"):
        (tmp_path / n).mkdir()
    amd = older_builds(tmp_path, "minimal", tmp_path / "minimal-fedcba9876543210")
    assert [p.name for p in amd] == ["minimal-0123456789abcdef"]
    arm = older_builds(tmp_path, "minimal-arm64", tmp_path / "minimal-arm64-1111111111111111")
    assert [p.name for p in arm] == ["minimal-arm64-0123456789abcdef"]
