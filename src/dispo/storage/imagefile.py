"""`dispo image export` and `dispo image import` of what it wrote: a sealed image as one file, to move it
between hosts.

The file is a POSIX tar (compressed with zstd unless asked not to) of exactly these members, in this order:

    manifest.json     {"format": "dispo-image/1", "name": ..., "sha256": <content digest>, "content": {...}}
    <file> ...        every file of the content manifest, in its order (rootfs.ext4, the kernel, ...)

followed by the tar's end (two zero blocks). "content" is the image's content manifest (storage/images.py) and
"sha256" its digest, the image's identity on every host. Regular files only; names are plain file names.

A loaded file is hostile until proven otherwise. The reader is our own, not tarfile: it knows only the members
above, reads every header and member with a cap (tarfile reads a pax or GNU long-name header whole, whatever
size it claims), and refuses links, devices, directories, path names, extended headers, unknown names, sizes
other than the manifest's, and anything after the end. Each file is hashed as it is written into a temporary
image holder (storage/images.py `seal_new`: journaled, renamed into place only when complete) and compared with
the manifest, whose digest is compared with the one the user expects (`--sha256`) before any file is read. The
loaded image's provenance is "imported" whatever it was where it was saved: a file proves nothing about who made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from dispo.errors import InvalidInput, StorageError
from dispo.infra.proc import minimal_env, which
from dispo.storage import backends
from dispo.storage.images import PORTABLE_META, Image, ImageStore, Provenance, content_digest
from dispo.storage.layout import META, ROOTFS

log = logging.getLogger(__name__)

FORMAT = "dispo-image/1"
MANIFEST = "manifest.json"
MAX_MANIFEST = 64 << 10         # a manifest is a few hundred bytes; kernel arguments make it longer, not this long
MAX_FILES = 16                  # rootfs, kernel, initrd, vmlinux, an SSH key: a handful
MAX_FILE_SIZE = 1 << 40         # 1 TiB: larger than any guest disk dispo builds, small enough to say "no" early
MAX_TRAILER = 64 << 10          # zero padding a tar writer may add after the end (GNU tar pads to 10 KiB)
BLOCK = 512
CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_HINT = "install zstd, or save with --uncompressed"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WORD = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CHUNK = bytes(CHUNK)
SPARSE_GRAIN = 64 << 10         # a zero run this long (and aligned) becomes a hole in the loaded file

Progress = Callable[[int, int], None]


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def _bad(what: str, hint: str = "") -> InvalidInput:
    return InvalidInput(f"not a valid dispo image file: {what}",
                        hint=hint or "make it with 'dispo image export NAME FILE' and copy it whole (a raw ext4 "
                                     "file goes in with 'dispo image import FILE --name NAME')")


# --- tar, the little of it this format uses --------------------------------------------------------------------

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def tar_header(name: str, size: int, mode: int, mtime: int = 0) -> bytes:
    """A POSIX ustar header of a regular file; a size of 8 GiB or more in the base-256 form GNU tar reads."""
    h = bytearray(BLOCK)
    h[0:len(name)] = name.encode("ascii")
    h[100:108] = _octal(mode & 0o777, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    if size < 8 ** 11:
        h[124:136] = _octal(size, 12)
    else:
        h[124:136] = (size | (0x80 << 88)).to_bytes(12, "big")
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[265:269] = b"root"
    h[297:301] = b"root"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


_KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
          b"5": "a directory", b"6": "a FIFO", b"x": "an extended header", b"g": "a global extended header",
          b"L": "a GNU long name", b"K": "a GNU long link name", b"S": "a GNU sparse file"}


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    mode: int


def parse_header(block: bytes) -> Member | None:
    """A header block, checked; None at the end of the archive (a zero block)."""
    if block == _ZERO_BLOCK:
        return None
    try:
        stored = int(block[148:156].rstrip(b"\0 ").decode("ascii"), 8)
    except ValueError:
        raise _bad("a tar header has no valid checksum") from None
    if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise _bad("a tar header's checksum does not match (the file is damaged)")
    kind = block[156:157]
    raw_name = block[0:100].split(b"\0", 1)[0]
    if kind not in (b"0", b"\0"):
        what = _KINDS.get(kind, "not a regular file")
        raise _bad(f"member {raw_name[:64]!r} is {what}")
    if block[257:265] != b"ustar\x0000":
        raise _bad("a tar header is not POSIX ustar")
    if block[345:500] != bytes(155):
        raise _bad(f"member {raw_name[:64]!r} has a path prefix")
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("a member's name is not ASCII") from None
    if name != MANIFEST and not _FILE_NAME.fullmatch(name):
        raise _bad(f"member {name[:64]!r} is not a plain file name")
    field = block[124:136]
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise _bad(f"member {name!r} has a negative or oversized size")
        size = int.from_bytes(field[1:], "big")
    else:
        try:
            size = int(field.rstrip(b"\0 ").decode("ascii") or "0", 8)
        except ValueError:
            raise _bad(f"member {name!r} has no valid size") from None
    try:
        mode = int(block[100:108].rstrip(b"\0 ").decode("ascii") or "0", 8)
    except ValueError:
        raise _bad(f"member {name!r} has no valid mode") from None
    return Member(name, size, mode)


def _padding(size: int) -> int:
    return -size % BLOCK


# --- reading: every read capped --------------------------------------------------------------------------------

class _Reader:
    """Exact reads from a stream; a short one means the file was cut short."""

    def __init__(self, stream: _Readable, finish: Callable[[], None] = lambda: None) -> None:
        self.stream = stream
        self.finish = finish  # at the stream's end: whatever decompressed it must have succeeded too

    def exact(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            part = self.stream.read(min(left, CHUNK))
            if not part:
                raise _bad("it ends too early (cut short while copying?)")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def header(self) -> Member | None:
        return parse_header(self.exact(BLOCK))

    def end(self) -> None:
        """The second zero block, then at most MAX_TRAILER bytes, all zero, then the stream's end."""
        if self.exact(BLOCK) != _ZERO_BLOCK:
            raise _bad("something follows its last member")
        seen = 0
        while chunk := self.stream.read(BLOCK):
            seen += len(chunk)
            if seen > MAX_TRAILER or chunk.count(0) != len(chunk):
                raise _bad("something follows its end")
        self.finish()


def _check_str(value: object, what: str, limit: int = 256) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise _bad(f"the manifest's {what} is not a short printable string")
    return value


def _check_meta(meta: object, names: set[str]) -> dict[str, Any]:
    """The portable keys of image.json, each of the type dispo writes and reads; files named must be there."""
    if not isinstance(meta, dict) or set(meta) - set(PORTABLE_META):
        raise _bad("the manifest's meta holds keys dispo does not know")
    for key in ("kernel", "initrd", "vmlinux", "ssh_key"):
        if key in meta and meta[key] != "" and (not isinstance(meta[key], str) or meta[key] not in names):
            raise _bad(f"the manifest's {key} names no file of the image")
    for key in ("ssh_user", "recipe", "build_key", "kernel_version", "from_image"):
        if key in meta:
            _check_str(meta[key], key)
    if "arch" in meta and _check_str(meta["arch"], "arch") not in ("x86_64", "aarch64"):
        raise _bad(f"unknown architecture {meta['arch']!r}")
    if "vmms" in meta and (not isinstance(meta["vmms"], list) or len(meta["vmms"]) > 8
                           or not all(isinstance(v, str) and _WORD.fullmatch(v) for v in meta["vmms"])):
        raise _bad("the manifest's vmms is not a list of VMM names")
    if "cmdline" in meta and (not isinstance(meta["cmdline"], list) or len(meta["cmdline"]) > 256 or not all(
            isinstance(a, str) and 0 < len(a) <= 1024 and a.isprintable() for a in meta["cmdline"])):
        raise _bad("the manifest's cmdline is not a list of kernel arguments")
    if "upstream" in meta and (not isinstance(meta["upstream"], dict) or len(meta["upstream"]) > 16 or not all(
            isinstance(k, str) and _check_str(k, "upstream") and _check_str(v, "upstream", 1024)
            for k, v in meta["upstream"].items())):
        raise _bad("the manifest's upstream is not a table of strings")
    return meta


@dataclass(frozen=True)
class Manifest:
    name: str
    sha256: str
    content: dict[str, Any]

    @property
    def files(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.content["files"]
        return entries

    @property
    def total(self) -> int:
        return sum(int(f["size"]) for f in self.files)


def parse_manifest(data: bytes) -> Manifest:
    """The manifest, checked down to every field, and its content digest recomputed."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad("its manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(f"its manifest's format is not {FORMAT!r}",
                   hint="it may come from a newer dispo; save it again with this one")
    if set(doc) != {"format", "name", "sha256", "content"}:
        raise _bad("its manifest holds unknown keys")
    name, sha, content = doc["name"], doc["sha256"], doc["content"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
        raise _bad("its manifest names no valid image name")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise _bad("its manifest's sha256 is not 64 hex digits")
    if not isinstance(content, dict) or set(content) != {"files", "meta"} or not isinstance(content["files"], list):
        raise _bad("its manifest's content is not a file list and a meta table")
    entries = content["files"]
    if not 0 < len(entries) <= MAX_FILES:
        raise _bad(f"its manifest lists {len(entries)} files (1 to {MAX_FILES})")
    names: list[str] = []
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"name", "size", "sha256"}:
            raise _bad("a file of its manifest is not {name, size, sha256}")
        if not isinstance(e["name"], str) or not _FILE_NAME.fullmatch(e["name"]) or e["name"] in (META, MANIFEST):
            raise _bad(f"its manifest lists a file with an invalid name {str(e['name'])[:64]!r}")
        if type(e["size"]) is not int or not 0 <= e["size"] <= MAX_FILE_SIZE:
            raise _bad(f"its manifest gives {e['name']} no valid size")
        if not isinstance(e["sha256"], str) or not _HEX64.fullmatch(e["sha256"]):
            raise _bad(f"its manifest gives {e['name']} no valid sha256")
        names.append(e["name"])
    if names != sorted(set(names)):
        raise _bad("its manifest's files are not sorted and unique")
    if ROOTFS not in names:
        raise _bad(f"its manifest lists no {ROOTFS}")
    _check_meta(content["meta"], set(names))
    if content_digest(content) != sha:
        raise _bad("its manifest's sha256 is not the digest of its content (the manifest was changed)")
    return Manifest(name, sha, content)


# --- zstd through its command-line tool (the standard library has no zstd before Python 3.14) -----------------------

@contextlib.contextmanager
def _unzstd(head: bytes, src: IO[bytes]) -> Iterator[_Reader]:
    """A reader of the decompressed stream of `head` + the rest of `src`. A feeder thread copies the input into
    zstd, so a pipe (stdin) works as a file does; zstd's own window limit (128 MiB by default) bounds its memory.
    zstd's exit status is checked when the reader reaches the end, before the image is put in place."""
    proc = subprocess.Popen([which("zstd", hint=ZSTD_HINT), "-d", "-q", "-c"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=minimal_env())
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        stdin = proc.stdin
        assert stdin is not None
        with contextlib.suppress(OSError, ValueError):  # zstd gone or its stdin closed: the reader says why
            stdin.write(head)
            while chunk := src.read(CHUNK):
                stdin.write(chunk)
        with contextlib.suppress(OSError, ValueError):
            stdin.close()

    def finish() -> None:
        # Its output ended, so zstd has exited or is exiting; trailing junk after its frames makes it fail.
        if proc.wait() != 0:
            raise _bad("its zstd compression is damaged")

    feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
    feeder.start()
    try:
        yield _Reader(proc.stdout, finish)
    finally:
        if proc.poll() is None:
            proc.kill()  # refused (or done with) before zstd's end
        proc.stdout.close()
        proc.wait()
        feeder.join(timeout=5)  # stuck only on a source that never ends (a pipe left open): it is a daemon


@contextlib.contextmanager
def _tar_stream(src: IO[bytes]) -> Iterator[_Reader]:
    head = src.read(4)
    if head == ZSTD_MAGIC:
        with _unzstd(head, src) as reader:
            yield reader
        return

    class _Joined:
        def __init__(self) -> None:
            self.head = head

        def read(self, n: int) -> bytes:
            if self.head:
                part, self.head = self.head[:n], self.head[n:]
                return part
            return src.read(n)

    yield _Reader(_Joined())


# --- load --------------------------------------------------------------------------------------------------------

def _receive(reader: _Reader, member: Member, dest: Path, progress: Callable[[int], None]) -> str:
    """Copy a member's bytes into a new file `dest` (never through a link), holes where the data is zero; its
    sha256."""
    h = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        off = 0
        while off < member.size:
            chunk = reader.exact(min(CHUNK, member.size - off))
            h.update(chunk)
            view = memoryview(chunk)
            for start in range(0, len(chunk), SPARSE_GRAIN):
                piece = view[start:start + SPARSE_GRAIN]
                if piece != _ZERO_CHUNK[:len(piece)]:
                    os.pwrite(fd, piece, off + start)
            off += len(chunk)
            progress(off)
        os.ftruncate(fd, member.size)
        # The saved mode's read bits (a private key stays private); owner-writable until the image is sealed.
        os.fchmod(fd, (member.mode & 0o444) | 0o600)
    finally:
        os.close(fd)
    reader.exact(_padding(member.size))
    return h.hexdigest()


def load(store: ImageStore, src: IO[bytes], *, name: str | None = None, expect: str | None = None,
         source: str = "", progress: Progress = lambda done, total: None) -> Image:
    """Import an image that `dispo image export` wrote, from the stream `src`, as image `name` (default: the
    name it was exported with).
    With `expect`, the content digest must be that sha256, checked before any file is read."""
    if expect is not None and not _HEX64.fullmatch(expect):
        raise InvalidInput(f"--sha256 {expect[:80]!r} is not 64 lowercase hex digits",
                           hint="copy the full sha256 from 'dispo image ls --digests' on the host that saved it")
    if name is not None:
        store.check_new(name)
    with _tar_stream(src) as reader:
        first = reader.header()
        if first is None or first.name != MANIFEST:
            raise _bad(f"its first member is not {MANIFEST}")
        if first.size > MAX_MANIFEST:
            raise _bad(f"its manifest is {first.size} bytes (at most {MAX_MANIFEST})")
        manifest = parse_manifest(reader.exact(first.size))
        reader.exact(_padding(first.size))
        if expect is not None and manifest.sha256 != expect:
            raise InvalidInput(f"image file holds sha256 {manifest.sha256}, not the {expect} expected",
                               hint="it is another image (or another version of it): check the file you copied")
        target = name or manifest.name
        log.info("loading image %s (sha256 %s, %d bytes)", target, manifest.sha256, manifest.total)

        def fill(tmp: Path, be: backends.DiskBackend) -> dict[str, str]:
            hashes: dict[str, str] = {}
            done = 0
            for entry in manifest.files:
                member = reader.header()
                if member is None or member.name != entry["name"]:
                    got = "its end" if member is None else repr(member.name)
                    raise _bad(f"{got} comes where the manifest has {entry['name']!r}")
                if member.size != entry["size"]:
                    raise _bad(f"{member.name} is {member.size} bytes, its manifest says {entry['size']}")
                def step(n: int, base: int = done) -> None:
                    progress(base + n, manifest.total)

                digest = _receive(reader, member, tmp / member.name, step)
                if digest != entry["sha256"]:
                    raise InvalidInput(f"image file damaged: {member.name} does not match its sha256 in the manifest",
                                       hint="copy the file again (compare its sha256sum on both hosts)")
                hashes[member.name] = digest
                done += member.size
            if reader.header() is not None:
                raise _bad("it has more members than its manifest lists")
            reader.end()
            return hashes

        image = store.seal_new(target, fill, manifest.content["meta"], source=source or "image file",
                               provenance=Provenance.IMPORTED, purpose=f"load image {target}")
    if image.digest != manifest.sha256:  # the manifest was made by the same function: a bug, not an attack
        store.remove(image.name)
        raise StorageError(f"loaded image {image.name!r} has digest {image.digest}, not {manifest.sha256}")
    return image


# --- save --------------------------------------------------------------------------------------------------------

def manifest_bytes(image: Image) -> bytes:
    doc = {"format": FORMAT, "name": image.name, "sha256": image.digest, "content": dict(image.content)}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _write_tar(image: Image, out: IO[bytes], progress: Progress) -> None:
    data = manifest_bytes(image)
    out.write(tar_header(MANIFEST, len(data), 0o444) + data + bytes(_padding(len(data))))
    entries: list[Mapping[str, Any]] = image.content["files"]
    total, done = sum(int(e["size"]) for e in entries), 0
    for e in entries:
        path = image.path / e["name"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size != e["size"]:
                raise _changed(image, e["name"])
            out.write(tar_header(e["name"], st.st_size, st.st_mode))
            left = st.st_size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise _changed(image, e["name"])
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
                done += len(chunk)
                progress(done, total)
        if h.hexdigest() != e["sha256"]:
            raise _changed(image, e["name"])
        out.write(bytes(_padding(st.st_size)))
    out.write(bytes(2 * BLOCK))


def _changed(image: Image, fname: str) -> StorageError:
    return StorageError(f"image {image.name!r}: {fname} no longer matches the sha256 recorded when it was sealed",
                        hint=f"check it with 'dispo image verify {image.name}'; remove it and make it again")


def save(image: Image, out: IO[bytes], *, compress: bool = True, progress: Progress = lambda d, t: None) -> None:
    """Write `image` to `out` (a file or a pipe) in the format above, checking every file against its recorded
    sha256 as it is read: a changed image is refused, not passed on."""
    if not compress:
        _write_tar(image, out, progress)
        out.flush()
        return
    out.flush()
    proc = subprocess.Popen([which("zstd", hint=ZSTD_HINT), "-q", "-c"], stdin=subprocess.PIPE, stdout=out,
                            stderr=subprocess.DEVNULL, env=minimal_env())
    assert proc.stdin is not None
    ok = False
    try:
        _write_tar(image, proc.stdin, progress)
        proc.stdin.close()
        ok = proc.wait() == 0
        if not ok:
            raise StorageError("zstd failed while compressing the image", hint="check the free space where it goes")
    except BrokenPipeError:
        raise StorageError("zstd stopped while compressing the image",
                           hint="check the free space where it goes") from None
    finally:
        if not ok:
            proc.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.wait()


def save_to_path(image: Image, dest: Path, *, compress: bool = True,
                 progress: Progress = lambda d, t: None) -> None:
    """`save` into a file: written beside it under a temporary name and renamed when complete, so a failure
    leaves no partial file. Private (0600) when the image holds a file others may not read (an SSH key)."""
    if dest.is_dir():
        raise InvalidInput(f"{dest} is a directory", hint="give the path of the file to write, e.g. NAME.dimg")
    private = any((image.path / e["name"]).stat().st_mode & 0o004 == 0 for e in image.content["files"])
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            save(image, out, compress=compress, progress=progress)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
