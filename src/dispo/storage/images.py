"""Known-good images: import, list, remove, verify. An image never changes after import.

images/<name>/ holds rootfs.ext4 and image.json, sealed read-only by the storage backend. An import
builds in images/.import-<session-id>-<name>/, recorded in a journal before it exists, and is renamed
into place only when complete, so a failed or killed import leaves nothing that looks like an image.

image.json records the image's provenance, written by dispo itself and sealed with the image: "built" (`dispo
image build`, a recipe or `--from`), "fetched" (`dispo image fetch`) or "imported" (`dispo image import`: a file
the user handed in, or `dispo image import` of an image exported on another host). Only a built or fetched image's code
may ever run on the host (`--from`, imagebuild/into.py).

An image is identified by its content digest (`Image.digest`, shown by `dispo image ls`), the same on every host
that holds the same image: the sha256 of its *content manifest*, the canonical JSON of the portable keys of
image.json (kernel, cmdline, arch, ...) and the name, size and sha256 of every file in it. Local facts (its name
here, when it was imported, the storage backend, provenance) are left out. The manifest is computed once, at
import, and sealed in image.json; `dispo image verify` re-hashes every file against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from dispo.config import Config, StorageBackend
from dispo.errors import CommandError, InvalidInput, NotFound, StorageError
from dispo.infra.proc import run
from dispo.infra.progress import Progress
from dispo.infra.txn import Transaction, transaction
from dispo.names import check_name, format_size
from dispo.storage import backends, files, pool, workspace
from dispo.storage.layout import META, ROOTFS

log = logging.getLogger(__name__)

E2FS_HINT = "install e2fsprogs"

# The keys of image.json that say what the image is wherever it lives: hashed into the content digest and carried
# by `dispo image export`. Every other key (name, size, sha256, storage, created, source, format, provenance, digest,
# content) is a fact of this host, or follows from the files.
PORTABLE_META = ("kernel", "initrd", "vmlinux", "cmdline", "arch", "vmms", "ssh_key", "ssh_user", "recipe",
                 "build_key", "kernel_version", "from_image", "upstream")


def content_digest(content: Mapping[str, Any]) -> str:
    """The sha256 of a content manifest's canonical JSON: the image's identity across hosts."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def make_content(holder: Path, meta: Mapping[str, Any], known: Mapping[str, str],
                 hash_file: Callable[[Path], str] = files.sha256_file) -> dict[str, Any]:
    """The content manifest of the image files in `holder`: every regular file but image.json, hashed unless its
    sha256 is in `known` (the rootfs, hashed already while it was copied or recorded at import)."""
    entries = []
    for f in sorted(holder.iterdir(), key=lambda p: p.name):
        if f.name == META:
            continue
        if f.is_symlink() or not f.is_file():
            raise StorageError(f"image holder {holder} holds {f.name}, which is not a regular file",
                               hint=f"remove the image with 'dispo image rm {holder.name}' and import it again")
        entries.append({"name": f.name, "size": f.stat().st_size, "sha256": known.get(f.name) or hash_file(f)})
    return {"files": entries, "meta": {k: meta[k] for k in PORTABLE_META if k in meta}}


# Content manifests of images sealed before manifests were recorded: computed from the recorded rootfs sha256 and
# the small files (kernel, initrd), once per process and image (keyed by image.json's inode and ctime).
_LEGACY: dict[tuple[str, int, int], dict[str, Any]] = {}


class Provenance(StrEnum):
    BUILT = "built"        # dispo image build: dispo made the tree from a recipe (or from a trusted image)
    FETCHED = "fetched"    # dispo image fetch: Firecracker's CI artifacts, checksums checked
    IMPORTED = "imported"  # dispo image import: a file the user handed in, whatever it contains

    @property
    def trusted(self) -> bool:
        """Whether dispo made or fetched it: the only images whose code dispo may run on the host."""
        return self is not Provenance.IMPORTED


def _provenance(meta: Mapping[str, Any]) -> Provenance:
    if "provenance" in meta:
        return Provenance(meta["provenance"])
    # image.json from before provenance was recorded: the keys only a build or a fetch ever wrote (an import
    # writes none of them), sealed with the image all the same.
    if "recipe" in meta:
        return Provenance.BUILT
    if "upstream" in meta:
        return Provenance.FETCHED
    return Provenance.IMPORTED


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    size: int
    sha256: str
    storage: StorageBackend
    created: float
    source: str
    # A bootable image also carries its kernel (and initrd), as file names inside the image directory,
    # the kernel arguments it needs, its architecture and the VMMs it is known to boot under.
    kernel: str = ""
    initrd: str = ""
    cmdline: tuple[str, ...] = ()
    arch: str = "x86_64"
    vmms: tuple[str, ...] = ()
    vmlinux: str = ""  # the kernel as an ELF vmlinux, for Firecracker on x86_64 (when `kernel` is a bzImage)
    provenance: Provenance = Provenance.IMPORTED
    recorded_content: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def content(self) -> Mapping[str, Any]:
        """The content manifest: recorded at import, or (an image from before) computed without the rootfs."""
        if self.recorded_content is not None:
            return self.recorded_content
        st = (self.path / META).stat()
        key = (str(self.path), st.st_ino, st.st_ctime_ns)
        if key not in _LEGACY:
            meta = json.loads((self.path / META).read_text())
            _LEGACY[key] = make_content(self.path, meta, {ROOTFS: self.sha256})
        return _LEGACY[key]

    @property
    def digest(self) -> str:
        """The sha256 identifying this image's content on any host (see the module's docstring)."""
        return content_digest(self.content)

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    @property
    def kernel_path(self) -> Path | None:
        return self.path / self.kernel if self.kernel else None

    @property
    def initrd_path(self) -> Path | None:
        return self.path / self.initrd if self.initrd else None

    @classmethod
    def load(cls, path: Path) -> Image:
        try:
            meta: dict[str, Any] = json.loads((path / META).read_text())
            return cls(name=meta["name"], path=path, size=int(meta["size"]), sha256=meta["sha256"],
                       storage=StorageBackend(meta["storage"]), created=float(meta["created"]),
                       source=meta.get("source", ""), kernel=str(meta.get("kernel", "")),
                       initrd=str(meta.get("initrd", "")), cmdline=tuple(map(str, meta.get("cmdline", ()))),
                       arch=str(meta.get("arch", "x86_64")), vmms=tuple(map(str, meta.get("vmms", ()))),
                       vmlinux=str(meta.get("vmlinux", "")), provenance=_provenance(meta),
                       recorded_content=meta.get("content"))
        except (OSError, ValueError, KeyError) as e:
            raise StorageError(f"image at {path} has no valid {META}: {e}",
                               hint=f"remove it with 'dispo image rm {path.name}' and import it again") from None


class ImageStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def list(self) -> list[Image]:
        pool.attach(self.cfg)
        if not self.cfg.images_dir.is_dir():
            return []
        return [Image.load(p) for p in sorted(self.cfg.images_dir.iterdir())
                if not p.name.startswith(".") and (p / META).exists()]

    def get(self, name: str) -> Image:
        check_name(name, what="image name")
        pool.attach(self.cfg)
        path = self.cfg.images_dir / name
        if not (path / META).exists():
            raise NotFound(f"image {name!r} not found in {self.cfg.images_dir}",
                           hint="list images with 'dispo image ls' or import one with 'dispo image import'")
        return Image.load(path)

    def remove(self, name: str) -> None:
        image = self.get(name)
        backends.remove_tree(image.path)

    def verify(self, name: str, progress: Progress | None = None) -> bool:
        """Every file of the image still has the sha256 recorded at import, and nothing was added or removed."""
        image = self.get(name)
        rootfs = files.sha256_file(image.rootfs, progress)
        if rootfs != image.sha256:
            return False
        recorded = image.recorded_content
        if recorded is None:
            return True  # sealed before manifests were recorded: only the rootfs hash was
        now = make_content(image.path, _raw_meta(image), {ROOTFS: rootfs})
        return now == recorded and content_digest(now) == _raw_meta(image).get("digest")

    def import_(self, src: Path, name: str, size: int | None = None, *, quiet: bool = False,
                extra_files: Mapping[str, Path] | None = None, extra_meta: Mapping[str, Any] | None = None,
                tx: Transaction | None = None, provenance: Provenance = Provenance.IMPORTED) -> Image:
        """Import a raw ext4 filesystem as image `name`, optionally grown to `size` bytes.

        `extra_files` (file name in the image -> source) carries a kernel and initrd; `extra_meta` adds
        keys such as kernel, initrd, cmdline, arch and vmms to image.json (never the core keys). With `tx`, the
        import joins the caller's transaction (a fetch or a build): one journal, undone by the caller's unwind.
        `provenance` is a core key: only dispo's build and fetch say anything but "imported"."""
        check_name(name, what="image name")
        src = Path(src)
        if not src.exists():
            raise NotFound(f"image file {src} does not exist", hint="check the path")
        if not src.is_file() and not src.is_dir():
            raise InvalidInput(f"{src} is not a regular file", hint="give the path of a raw ext4 image file")
        if src.is_file() and saved_image_file(src):
            raise InvalidInput(f"{src} is an image file written by 'dispo image export', not an ext4 filesystem",
                               hint=f"import it whole with 'dispo image import {src}'")
        files.check_ext4(src)
        src_size = src.stat().st_size
        if size is not None and size < src_size:
            raise InvalidInput(f"--size {format_size(size)} is smaller than the image ({format_size(src_size)})",
                               hint="images can only grow; give a size at least as large as the file")
        for fname in extra_files or {}:
            if fname in (ROOTFS, META) or "/" in fname or fname.startswith("."):
                raise InvalidInput(f"invalid extra image file name {fname!r}")

        def fill(tmp: Path, be: backends.DiskBackend) -> dict[str, str]:
            be.put_file(src, tmp / ROOTFS, Progress(f"copying {src.name}", quiet=quiet))
            if size is not None and size > src_size:
                grow_ext4(tmp / ROOTFS, size)
            for fname, fsrc in (extra_files or {}).items():
                be.put_file(Path(fsrc), tmp / fname)
                # Keep the source's permissions: a private key stays private inside the image.
                os.chmod(tmp / fname, Path(fsrc).stat().st_mode & 0o777)
            return {ROOTFS: files.sha256_file(tmp / ROOTFS, Progress(f"hashing {name}", quiet=quiet))}

        image = self.seal_new(name, fill, extra_meta or {}, source=str(src.resolve()), provenance=provenance,
                              purpose=f"import image {name}", tx=tx)
        log.info("imported %s as image %s (%s, %s)", src, name, image.storage.value, format_size(image.size))
        return image

    def check_new(self, name: str) -> Path:
        """Where image `name` would go; refused now if the name is bad or taken, before any long work."""
        check_name(name, what="image name")
        dest = self.cfg.images_dir / name
        if dest.exists():
            raise InvalidInput(f"image {name!r} already exists", hint=f"remove it first with 'dispo image rm {name}'")
        return dest

    def seal_new(self, name: str, fill: Callable[[Path, backends.DiskBackend], Mapping[str, str]],
                 meta: Mapping[str, Any], *, source: str, provenance: Provenance, purpose: str,
                 tx: Transaction | None = None) -> Image:
        """Make image `name`: `fill` puts its files (the rootfs first of all) into a temporary holder and returns
        the sha256 of those it hashed on the way; then its content manifest and image.json are written, the holder
        sealed and renamed into place. The holder is recorded in a journal before it exists and renamed only when
        complete, so a failure (or a kill) anywhere leaves nothing that looks like an image."""
        workspace.ensure(self.cfg)
        dest = self.check_new(name)
        kind = workspace.storage_backend(self.cfg)
        be = backends.backend(kind)
        with pool.in_use(self.cfg), transaction(self.cfg, purpose=purpose, join=tx) as t:
            tmp = self.cfg.images_dir / f".import-{t.session_id}-{name}"
            entry = t.journal.record(be.undo_kind, path=str(tmp))
            be.make_holder(tmp)
            known = fill(tmp, be)
            files.check_ext4(tmp / ROOTFS)
            core = {k: v for k, v in meta.items() if k in PORTABLE_META}
            content = make_content(tmp, core, known)
            record: dict[str, Any] = {
                **meta,
                "name": name, "size": (tmp / ROOTFS).stat().st_size, "sha256": known[ROOTFS],
                "storage": kind.value, "created": time.time(), "source": source, "format": 1,
                "provenance": provenance.value, "content": content, "digest": content_digest(content),
            }
            (tmp / META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            be.seal(tmp)
            try:
                os.rename(tmp, dest)
            except OSError as e:
                raise StorageError(f"image {name!r} could not be put in place: {e.strerror}",
                                   hint=f"another image {name!r} may have appeared meanwhile; check 'dispo image ls'"
                                   ) from None
            t.journal.forget(entry)
        return Image.load(dest)


def saved_image_file(path: Path) -> bool:
    """Whether `path` starts as `dispo image export` writes: zstd's magic, or a ustar header (storage/imagefile.py)."""
    try:
        with open(path, "rb") as f:
            head = f.read(265)
    except OSError:
        return False
    return head[:4] == b"\x28\xb5\x2f\xfd" or head[257:265] == b"ustar\x0000"


def _raw_meta(image: Image) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((image.path / META).read_text())
    return meta


def grow_ext4(path: Path, size: int) -> None:
    """Grow an ext4 image offline: sparse extend, check, resize (no mount, no dd)."""
    os.truncate(path, size)
    # -p fixes what is safe; exit code 1 means "fixed", which is fine before a resize.
    proc = run(["e2fsck", "-f", "-p", path], check=False, hint=E2FS_HINT)
    if proc.returncode not in (0, 1):
        raise CommandError(["e2fsck", "-f", "-p", str(path)], proc.returncode, proc.stderr or proc.stdout,
                           hint="the image's filesystem is damaged; repair it before importing")
    run(["resize2fs", path], hint=E2FS_HINT)
