"""Kernels for Firecracker: on x86_64 it boots an uncompressed ELF vmlinux, distributions ship a bzImage.

A bzImage is a real-mode setup block followed by a small decompressor and the compressed vmlinux. The
boot header (protocol >= 2.08) says exactly where the payload is (payload_offset/payload_length); older
or unusual images are scanned for compressor magic instead, as the kernel's scripts/extract-vmlinux does.
The result is only accepted if it is an ELF64 executable for the expected machine.
"""

from __future__ import annotations

import bz2
import lzma
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dispo.errors import CommandError, InvalidInput, NotFound
from dispo.infra.proc import run

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 0x3E
EM_AARCH64 = 0xB7
_MACHINES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}


class Compression(StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    LZMA = "lzma"
    BZIP2 = "bzip2"
    LZ4 = "lz4"
    ZSTD = "zstd"


# Magic at the start of each compressed stream, as the kernel's build writes them.
MAGIC: dict[Compression, bytes] = {
    Compression.GZIP: b"\x1f\x8b\x08",
    Compression.XZ: b"\xfd7zXZ\x00",
    Compression.LZMA: b"\x5d\x00\x00",
    Compression.BZIP2: b"BZh",
    Compression.LZ4: b"\x02\x21\x4c\x18",  # lz4 legacy frame, what the kernel uses
    Compression.ZSTD: b"\x28\xb5\x2f\xfd",
}


@dataclass(frozen=True)
class ElfInfo:
    machine: str
    entry: int
    size: int


@dataclass(frozen=True)
class Extracted:
    path: Path
    compression: Compression | None  # None: the input already was an ELF vmlinux
    elf: ElfInfo


def elf_info(data: bytes) -> ElfInfo | None:
    """Machine and entry of an ELF64 little-endian executable with program headers, else None."""
    if len(data) < 64 or data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return None
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    (e_entry,) = struct.unpack_from("<Q", data, 24)
    (e_phoff,) = struct.unpack_from("<Q", data, 32)
    (e_phnum,) = struct.unpack_from("<H", data, 56)
    if e_type != 2 or e_machine not in _MACHINES or e_phnum == 0 or e_phoff + 56 * e_phnum > len(data):
        return None
    return ElfInfo(_MACHINES[e_machine], e_entry, len(data))


def check_vmlinux(path: Path, machine: str = "x86_64") -> ElfInfo:
    """Raise InvalidInput unless `path` is an ELF vmlinux Firecracker can boot on `machine`."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        raise NotFound(f"kernel {path} does not exist", hint="check the path") from None
    except OSError as e:
        raise InvalidInput(f"kernel {path} is not readable: {e.strerror}") from None
    info = elf_info(head)
    if info is None:
        raise InvalidInput(f"kernel {path} is not an ELF vmlinux",
                           hint="Firecracker boots an uncompressed vmlinux; convert a bzImage with "
                                "dispo.kernels.extract_vmlinux")
    if info.machine != machine:
        raise InvalidInput(f"kernel {path} is built for {info.machine}, not {machine}",
                           hint="use a kernel for the host's architecture")
    return info


def _header_payload(data: bytes) -> bytes | None:
    """The compressed payload located by the x86 boot header, or None if the header does not say."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(data):
        return None
    return data[start:start + length]


def _stream(decomp: Callable[[bytes], bytes], data: bytes) -> bytes | None:
    try:
        return decomp(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
        return None


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _external(tool: str, argv: Callable[[Path, Path], list[str]]) -> Callable[[bytes], bytes]:
    """lz4 and zstd have no module in the standard library: use their command line tools on temp files.

    Trailing bytes after the stream (the scan case) make them exit non-zero after writing the whole
    output, so the exit code is ignored and the output judged by the ELF check instead.
    """

    def decomp(data: bytes) -> bytes:
        if shutil.which(tool) is None:
            raise NotFound(f"'{tool}' is not installed", hint=f"install the {tool} package to unpack this kernel")
        with tempfile.TemporaryDirectory(prefix="dispo-kernel-") as tmp:
            src, dst = Path(tmp) / "in", Path(tmp) / "out"
            src.write_bytes(data)
            run([tool, *argv(src, dst)], check=False)
            return dst.read_bytes() if dst.exists() else b""

    return decomp


_DECOMPRESS: dict[Compression, Callable[[bytes], bytes]] = {
    Compression.GZIP: _gzip,
    Compression.XZ: _xz,
    Compression.LZMA: _lzma,
    Compression.BZIP2: _bzip2,
    Compression.LZ4: _external("lz4", lambda src, dst: ["-d", "-f", "-q", str(src), str(dst)]),
    Compression.ZSTD: _external("zstd", lambda src, dst: ["-d", "-f", "-q", str(src), "-o", str(dst)]),
}


def zstd_frame_length(data: bytes) -> int | None:
    """Bytes taken by the zstd frame at the start of `data` (RFC 8878), or None if it is cut short.

    zstd deletes its output when trailing bytes follow the frame, so the frame is cut out first.
    """
    try:
        fhd = data[4]
        fcs_flag, single, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
        pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
        while True:
            (hdr,) = struct.unpack_from("<I", data[pos:pos + 3] + b"\0")
            last, btype, size = hdr & 1, (hdr >> 1) & 3, hdr >> 3
            if btype == 3:
                return None
            pos += 3 + (1 if btype == 1 else size)
            if last:
                break
        pos += 4 * checksum
    except (IndexError, struct.error):
        return None
    return pos if pos <= len(data) else None


def _try(kind: Compression, data: bytes) -> bytes | None:
    if kind is Compression.ZSTD:
        length = zstd_frame_length(data)
        if length is None:
            return None
        data = data[:length]
    out = _stream(_DECOMPRESS[kind], data)
    return out if out and elf_info(out) is not None else None


def decompress_payload(data: bytes) -> tuple[Compression, bytes]:
    """Find and unpack the vmlinux in a bzImage's bytes. Raises InvalidInput if there is none."""
    payload = _header_payload(data)
    if payload is not None:
        for kind, magic in MAGIC.items():
            if payload.startswith(magic) and (out := _try(kind, payload)) is not None:
                return kind, out
    # No usable header: try every magic at every position, first match wins (extract-vmlinux's way).
    hits = sorted((pos, kind) for kind, magic in MAGIC.items() for pos in _find_all(data, magic))
    for pos, kind in hits:
        if (out := _try(kind, data[pos:])) is not None:
            return kind, out
    raise InvalidInput("no compressed vmlinux found in the kernel image",
                       hint="give a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux")


def _find_all(data: bytes, magic: bytes, limit: int = 64) -> list[int]:
    out: list[int] = []
    pos = data.find(magic)
    while pos >= 0 and len(out) < limit:
        out.append(pos)
        pos = data.find(magic, pos + 1)
    return out


def _read_kernel(src: Path) -> bytes:
    try:
        return src.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"kernel {src} does not exist", hint="check the path") from None
    except OSError as e:
        raise InvalidInput(f"kernel {src} is not readable: {e.strerror}") from None


def extract_vmlinux(src: Path, dest: Path, machine: str = "x86_64") -> Extracted:
    """Write the ELF vmlinux inside bzImage `src` to `dest` (a copy if `src` already is one).

    The output appears atomically: a partial file never carries the final name.
    """
    data = _read_kernel(src)
    compression: Compression | None = None
    if elf_info(data) is None:
        try:
            compression, data = decompress_payload(data)
        except CommandError as e:  # pragma: no cover - the tools are run with check=False
            raise InvalidInput(f"cannot unpack kernel {src}: {e}") from None
    info = elf_info(data)
    assert info is not None
    if info.machine != machine:
        raise InvalidInput(f"kernel {src} is built for {info.machine}, not {machine}",
                           hint="use a kernel for the host's architecture")
    _write_atomically(dest, data)
    return Extracted(dest, compression, info)


def _write_atomically(dest: Path, data: bytes) -> None:
    """`data` as `dest`, complete or not at all (a temporary name beside it, renamed)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# -- arm64: the Image format ------------------------------------------------------------------------------
# An arm64 kernel is a flat `Image` with a 64-byte header: "ARM\x64" at offset 0x38 (Documentation/arch/arm64/
# booting.rst). Debian ships it gzip-compressed as /boot/vmlinuz-*. QEMU's -kernel takes either; Firecracker on
# aarch64 only the uncompressed Image, so images carry that one and both VMMs boot it.
ARM64_MAGIC = b"ARM\x64"
ARM64_MAGIC_OFFSET = 0x38
ARM64_IMAGE_MAX = 256 << 20   # no arm64 kernel Image comes near this: a bigger output is not a kernel


def is_arm64_image(data: bytes) -> bool:
    return len(data) >= 64 and data[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC


def kernel_arch(path: Path) -> str | None:
    """The architecture a kernel file is for, from its format: x86_64 (bzImage or ELF), aarch64 (Image, gzip'd
    Image or ELF), None when it is none of those (or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 12)
    except OSError:
        return None
    if head.startswith(MAGIC[Compression.GZIP]):  # Debian's arm64 vmlinuz: look at what it unpacks to
        try:
            with open(path, "rb") as f:
                head = zlib.decompressobj(wbits=31).decompress(f.read(1 << 16), 128)
        except (OSError, zlib.error):
            return None
    found = None
    if is_arm64_image(head):
        found = "aarch64"
    elif len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        found = "x86_64"
    elif head[:4] == ELF_MAGIC and len(head) >= 20:
        (e_machine,) = struct.unpack_from("<H", head, 18)
        found = _MACHINES.get(e_machine)
    return found


def arm64_image(src: Path, dest: Path, max_size: int = ARM64_IMAGE_MAX) -> int:
    """Write the uncompressed arm64 Image in `src` (gzip'd, as Debian ships it, or already plain) to `dest`,
    decompressed with a size cap; checks the header's magic. Returns its size. Atomic like extract_vmlinux."""
    raw = _read_kernel(src)
    if raw.startswith(MAGIC[Compression.GZIP]):
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(raw, max_size + 1)
        except zlib.error as e:
            raise InvalidInput(f"kernel {src} is a damaged gzip stream: {e}") from None
        if len(data) > max_size:
            raise InvalidInput(f"kernel {src} unpacks to more than {max_size >> 20} MiB: not an arm64 Image",
                               hint="give Debian's /boot/vmlinuz-* of an arm64 kernel package")
    else:
        data = raw
    if not is_arm64_image(data):
        raise InvalidInput(f"kernel {src} is not an arm64 Image (no ARM\\x64 magic at 0x38)",
                           hint="give an arm64 kernel (linux-image-arm64's /boot/vmlinuz-*)")
    _write_atomically(dest, data)
    return len(data)


def check_arm64_image(path: Path) -> None:
    """Raise InvalidInput unless `path` is an uncompressed arm64 Image (what Firecracker on aarch64 boots)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise NotFound(f"kernel {path} does not exist", hint="check the path") from None
    except OSError as e:
        raise InvalidInput(f"kernel {path} is not readable: {e.strerror}") from None
    if not is_arm64_image(head):
        raise InvalidInput(f"kernel {path} is not an uncompressed arm64 Image",
                           hint="Firecracker on aarch64 boots an uncompressed Image (ARM\\x64 magic at 0x38); "
                                "rebuild the image with 'dispo image build RECIPE --arch arm64 --force'")
