"""Known-good images: import, list, remove, verify. An image never changes after import.

images/<name>/ holds rootfs.ext4 and image.json, sealed read-only by the storage backend. An import
builds in images/.import-<session-id>-<name>/, recorded in a journal before it exists, and is renamed
into place only when complete, so a failed or killed import leaves nothing that looks like an image.

image.json records the image's provenance, written by dispo itself and sealed with the image: "built" (`dispo
image build`, a recipe or `--from`), "fetched" (`dispo image fetch`) or "imported" (`dispo image import`: a file
the user handed in). Only a built or fetched image's code may ever run on the host (`--from`, imagebuild/into.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
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
                       vmlinux=str(meta.get("vmlinux", "")), provenance=_provenance(meta))
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
        image = self.get(name)
        return files.sha256_file(image.rootfs, progress) == image.sha256

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
        files.check_ext4(src)
        src_size = src.stat().st_size
        if size is not None and size < src_size:
            raise InvalidInput(f"--size {format_size(size)} is smaller than the image ({format_size(src_size)})",
                               hint="images can only grow; give a size at least as large as the file")
        workspace.ensure(self.cfg)
        dest = self.cfg.images_dir / name
        if dest.exists():
            raise InvalidInput(f"image {name!r} already exists", hint=f"remove it first with 'dispo image rm {name}'")
        kind = workspace.storage_backend(self.cfg)
        be = backends.backend(kind)
        with pool.in_use(self.cfg), transaction(self.cfg, purpose=f"import image {name}", join=tx) as t:
            tmp = self.cfg.images_dir / f".import-{t.session_id}-{name}"
            entry = t.journal.record(be.undo_kind, path=str(tmp))
            be.make_holder(tmp)
            be.put_file(src, tmp / ROOTFS, Progress(f"copying {src.name}", quiet=quiet))
            if size is not None and size > src_size:
                grow_ext4(tmp / ROOTFS, size)
            for fname, fsrc in (extra_files or {}).items():
                if fname in (ROOTFS, META) or "/" in fname or fname.startswith("."):
                    raise InvalidInput(f"invalid extra image file name {fname!r}")
                be.put_file(Path(fsrc), tmp / fname)
                # Keep the source's permissions: a private key stays private inside the image.
                os.chmod(tmp / fname, Path(fsrc).stat().st_mode & 0o777)
            digest = files.sha256_file(tmp / ROOTFS, Progress(f"hashing {name}", quiet=quiet))
            meta: dict[str, Any] = {
                **(extra_meta or {}),
                "name": name, "size": (tmp / ROOTFS).stat().st_size, "sha256": digest, "storage": kind.value,
                "created": time.time(), "source": str(src.resolve()), "format": 1,
                "provenance": provenance.value,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            be.seal(tmp)
            try:
                os.rename(tmp, dest)
            except OSError as e:
                raise StorageError(f"image {name!r} could not be put in place: {e.strerror}") from None
            t.journal.forget(entry)
        log.info("imported %s as image %s (%s, %s)", src, name, kind.value, format_size(meta["size"]))
        return Image.load(dest)


def grow_ext4(path: Path, size: int) -> None:
    """Grow an ext4 image offline: sparse extend, check, resize (no mount, no dd)."""
    os.truncate(path, size)
    # -p fixes what is safe; exit code 1 means "fixed", which is fine before a resize.
    proc = run(["e2fsck", "-f", "-p", path], check=False, hint=E2FS_HINT)
    if proc.returncode not in (0, 1):
        raise CommandError(["e2fsck", "-f", "-p", str(path)], proc.returncode, proc.stderr or proc.stdout,
                           hint="the image's filesystem is damaged; repair it before importing")
    run(["resize2fs", path], hint=E2FS_HINT)
