"""bzImage -> ELF vmlinux: every compression the kernel build offers, found by header or by scan,
and Debian's real cloud kernel accepted by the real firecracker."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from dispo.errors import InvalidInput, NotFound
from dispo.kernels import Compression, check_vmlinux, elf_info, extract_vmlinux
from tests.fcworld import firecracker_or_skip_reason, tiny_elf

CACHE = Path(os.environ.get("DISPO_TEST_CACHE", "/var/cache/dispo-tests"))


def compress(kind: Compression, data: bytes, tmp: Path) -> bytes:
    if kind is Compression.GZIP:
        return gzip.compress(data)
    if kind is Compression.XZ:
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind is Compression.LZMA:
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    if kind is Compression.BZIP2:
        return bz2.compress(data)
    src = tmp / "payload"
    src.write_bytes(data)
    out = tmp / f"payload.{kind.value}"
    # The kernel's lz4 is the legacy frame format (lz4 -l), its zstd a plain frame.
    argv = ["lz4", "-l", "-f", "-q", src, out] if kind is Compression.LZ4 else ["zstd", "-f", "-q", src, "-o", out]
    subprocess.run([str(a) for a in argv], check=True)
    return out.read_bytes()


def fake_bzimage(payload: bytes, *, header: bool) -> bytes:
    """Setup block + decompressor stub + payload + trailer, with or without a boot header pointing at it."""
    setup = bytearray(1024)  # setup_sects = 1: the protected-mode part starts at 1024
    stub = os.urandom(300).replace(b"\x1f\x8b", b"..").replace(b"\xfd7", b"..").replace(b"BZh", b"...")
    if header:
        setup[0x1F1] = 1
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, 0x20F)
        struct.pack_into("<II", setup, 0x248, len(stub), len(payload))
    return bytes(setup) + stub + payload + b"\x00" * 64 + b"trailer"


@pytest.fixture
def vmlinux(tmp_path: Path) -> bytes:
    # A real ELF plus some bulk so the compressors have something to chew on.
    path = tiny_elf(tmp_path / "elf")
    return path.read_bytes() + bytes(range(256)) * 64


@pytest.mark.parametrize("header", [True, False], ids=["boot-header", "scan"])
@pytest.mark.parametrize("kind", list(Compression))
def test_extract_each_compression(tmp_path: Path, vmlinux: bytes, kind: Compression, header: bool) -> None:
    if kind in (Compression.LZ4, Compression.ZSTD) and shutil.which(kind.value) is None:
        pytest.skip(f"{kind.value} is not installed (apt package {kind.value})")
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(compress(kind, vmlinux, tmp_path), header=header))
    out = extract_vmlinux(bz, tmp_path / "vmlinux")
    assert out.compression is kind
    assert (tmp_path / "vmlinux").read_bytes() == vmlinux
    assert out.elf.machine == "x86_64"
    assert check_vmlinux(tmp_path / "vmlinux").entry == out.elf.entry


def test_an_elf_is_copied_as_is(tmp_path: Path) -> None:
    src = tiny_elf(tmp_path / "elf")
    out = extract_vmlinux(src, tmp_path / "vmlinux")
    assert out.compression is None and (tmp_path / "vmlinux").read_bytes() == src.read_bytes()


def test_not_a_kernel_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(gzip.compress(b"just text, no ELF inside " * 100), header=True))
    with pytest.raises(InvalidInput, match="no compressed vmlinux") as e:
        extract_vmlinux(bz, tmp_path / "vmlinux")
    assert "\n" not in e.value.one_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bzImage"]


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    data = bytearray(tiny_elf(tmp_path / "elf").read_bytes())
    struct.pack_into("<H", data, 18, 0xB7)  # e_machine = aarch64
    (tmp_path / "arm").write_bytes(bytes(data))
    assert elf_info(bytes(data)) is not None
    with pytest.raises(InvalidInput, match="built for aarch64"):
        check_vmlinux(tmp_path / "arm")
    with pytest.raises(InvalidInput, match="built for aarch64"):
        extract_vmlinux(tmp_path / "arm", tmp_path / "out")


def test_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        extract_vmlinux(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(NotFound):
        check_vmlinux(tmp_path / "nope")


def debian_cloud_kernel(tmp_path: Path) -> Path:
    """/boot/vmlinuz-* from Debian's linux-image-cloud-amd64, downloaded once (apt) into a cache dir."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    debs = sorted(CACHE.glob("linux-image-*-cloud-amd64_*.deb"))
    if not debs:
        deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True)
        pkgs = [ln.split(":", 1)[1].strip() for ln in deps.stdout.splitlines() if ln.strip().startswith("Depends:")]
        if deps.returncode != 0 or not pkgs:
            pytest.skip("apt does not know linux-image-cloud-amd64 (run apt-get update)")
        CACHE.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(["apt-get", "download", pkgs[0]], cwd=CACHE, capture_output=True, text=True)
        debs = sorted(CACHE.glob("linux-image-*-cloud-amd64_*.deb"))
        if got.returncode != 0 or not debs:
            pytest.skip(f"apt-get download {pkgs[0]} failed: {got.stderr.strip()[-200:]}")
    root = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return next((root / "boot").glob("vmlinuz-*"))


@pytest.mark.root
def test_debian_cloud_kernel_becomes_a_vmlinux(tmp_path: Path) -> None:
    bz = debian_cloud_kernel(tmp_path)
    out = extract_vmlinux(bz, tmp_path / "vmlinux")
    assert out.compression is not None
    assert out.elf.machine == "x86_64" and out.elf.size > 10 << 20
    # The independent check: file(1) agrees it is an x86-64 ELF executable.
    if shutil.which("file"):
        desc = subprocess.run(["file", "-b", str(tmp_path / "vmlinux")], capture_output=True, text=True).stdout
        assert "ELF 64-bit LSB executable, x86-64" in desc


FC, WHY = firecracker_or_skip_reason()


@pytest.mark.root
@pytest.mark.firecracker
@pytest.mark.skipif(FC is None, reason=WHY)
def test_firecracker_accepts_the_extracted_debian_kernel(tmp_path: Path) -> None:
    """boot-source succeeds and InstanceStart returns (the guest itself does not boot under this KVM)."""
    from dispo.infra.txn import transaction
    from dispo.vmm.base import MachineSpec
    from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm
    from tests.fcworld import Contract, processes_mentioning
    from tests.worlds import make_config, make_ext4

    assert FC is not None
    vmlinux = extract_vmlinux(debian_cloud_kernel(tmp_path), tmp_path / "vmlinux").path
    cfg = make_config(tmp_path / "ws", tmp_path / "st")
    with transaction(cfg, purpose="kernel test") as s:
        spec = MachineSpec(s.session_id, vmlinux, make_ext4(tmp_path / "d.ext4", "16M"), s.state_path,
                           cmdline=("console=ttyS0", "panic=1"), memory_mib=256)
        vmm = FirecrackerVmm(spec, FirecrackerOptions(binary=FC, on_request=Contract().check, shutdown_grace=0.2))
        vmm.start(s.journal)  # raises on any API fault: boot-source and InstanceStart both succeeded
        assert vmm.api is not None and vmm.api.describe_instance()["state"] == "Running"
        vmm.stop(timeout=3)
        assert processes_mentioning(f"dispo-{s.session_id}") == []
