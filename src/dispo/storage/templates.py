"""Templates for warm starts: a booted, ready guest saved as memory + device state + the disk that belongs to it.

<workspace>/templates/<kind>-<name>/ (kind: "profile" or "image"; "<kind>-<name>+automation" for an automation
template: a profile's browser saved with its debugging port on the guest's loopback, which only automation
sessions restore from, and no other session ever does) holds
    rootfs.ext4        the guest's disk at the moment its vCPUs stopped
    memory.qemu        QEMU: the device state (a migration stream without the RAM), and
    ram.qemu           QEMU: the guest's RAM (sparse), which its clones map privately (vmm/qemu.py), or
    snapshot.state, snapshot.mem.full, firecracker.json   Firecracker: its snapshot
    template.json      what it was made of: the image (name, sha256, created), backend, memory, vCPUs, the
                       agent's hash, and each file's size and sha256
sealed like an image by the storage backend (a read-only btrfs subvolume, or files without write bits). A
build happens in templates/.build-<session>-<key>/, recorded in the building session's journal before it
exists, and is renamed into place when complete: a failed build leaves nothing that looks like a template.

A template is *current* when its image is the one it was made of (same sha256 and import time), the agent in
this dispo is the one it carries, and its files are unchanged since sealing (size, inode, mtime): anything
else is refused with a one-line reason (`stale_reason`), as is a QEMU template of format 1 (its RAM inside the
migration stream, which no clone could share). Sessions never write a template's files: each clones the disk
(snapshot/reflink/copy) and maps the memory copy-on-write, so the clones of a template share its untouched
pages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dispo import guest
from dispo.config import Config, StorageBackend
from dispo.errors import NotFound, StorageError
from dispo.infra.txn import Transaction
from dispo.names import check_name, format_size
from dispo.storage import backends, files, pool
from dispo.storage.images import Image
from dispo.storage.layout import ROOTFS

log = logging.getLogger(__name__)

META = "template.json"
FORMAT = 2              # 2: a QEMU template's RAM is a file of its own (ram.qemu) its clones map privately
# The suffix of an automation template's key and of its name where one is given ("chromium+automation"): "+" is
# in no profile or image name (names.check_name), so the two keys of one profile never collide.
AUTOMATION = "+automation"


class TemplateKind(StrEnum):
    PROFILE = "profile"   # the profile's app running on its display, on a blank page
    IMAGE = "image"       # the image booted to a shell (SSH ready)


def agent_hash() -> str:
    return hashlib.sha256(guest.resource("agent.pl")).hexdigest()[:16]


def templates_dir(cfg: Config) -> Path:
    return cfg.workspace / "templates"


def key_of(kind: TemplateKind, name: str, automation: bool = False) -> str:
    return f"{kind.value}-{name}{AUTOMATION if automation else ''}"


def split_name(name: str) -> tuple[str, bool]:
    """"chromium+automation" -> ("chromium", True); "chromium" -> ("chromium", False)."""
    return (name[:-len(AUTOMATION)], True) if name.endswith(AUTOMATION) else (name, False)


@dataclass(frozen=True)
class Template:
    name: str
    kind: TemplateKind
    path: Path
    image: str
    image_sha256: str
    image_created: float
    backend: str
    memory_mib: int
    vcpus: int
    shm_mib: int
    display: str
    mac: str
    created: float
    agent: str
    storage: StorageBackend
    build_s: float = 0.0
    vmm_version: str = ""   # the VMM that saved the state ("qemu QEMU emulator version 7.2.22 ...")
    # The session settings its guest took at boot (time zone, language, quiet browser: request.cmdline()); a
    # clone keeps them, so only a request with the same settings fits.
    guest_args: tuple[str, ...] = ()
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = FORMAT
    # The protocol of the debugging port its browser was started with ("cdp", "bidi"), "" for none: an
    # automation template (its key ends in AUTOMATION) serves automation sessions only, and only it does.
    automation: str = ""

    @property
    def key(self) -> str:
        return key_of(self.kind, self.name, bool(self.automation))

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())

    @classmethod
    def load(cls, path: Path) -> Template:
        try:
            m: dict[str, Any] = json.loads((path / META).read_text())
            return cls(name=str(m["name"]), kind=TemplateKind(m["kind"]), path=path, image=str(m["image"]),
                       image_sha256=str(m["image_sha256"]), image_created=float(m["image_created"]),
                       backend=str(m["backend"]), memory_mib=int(m["memory_mib"]), vcpus=int(m["vcpus"]),
                       shm_mib=int(m.get("shm_mib", 0)), display=str(m.get("display", "none")),
                       mac=str(m["mac"]), created=float(m["created"]), agent=str(m["agent"]),
                       storage=StorageBackend(m["storage"]), build_s=float(m.get("build_s", 0.0)),
                       vmm_version=str(m.get("vmm_version", "")), guest_args=tuple(m.get("guest_args", ())),
                       files=dict(m.get("files", {})), format=int(m.get("format", 1)),
                       automation=str(m.get("automation") or ""))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StorageError(f"template at {path} has no valid {META}: {e}",
                               hint=f"remove it with 'dispo template rm {path.name}' and build it again") from None

    def stale_reason(self, image: Image | None, vmm_version: str = "") -> str | None:
        """Why this template must not be restored (one line), or None when it is current. `vmm_version`: the
        VMM this host would restore it with (a saved state is only loaded by the version that wrote it)."""
        return next(self._stale(image, vmm_version), None)

    def _stale(self, image: Image | None, vmm_version: str) -> Iterator[str]:
        if image is None:
            yield f"its image {self.image!r} is gone"
        elif image.sha256 != self.image_sha256 or abs(image.created - self.image_created) > 1e-3:
            yield f"its image {self.image!r} changed since the template was made"
        if self.backend == "qemu" and self.format < 2:
            yield "it was made by an older dispo (its clones could not share its memory)"
        if self.agent != agent_hash():
            yield "it carries another version of dispo's guest agent"
        if vmm_version and self.vmm_version and vmm_version != self.vmm_version:
            yield f"it was saved by {self.vmm_version}, this host has {vmm_version}"
        for name, info in self.files.items():
            try:
                st = os.stat(self.path / name, follow_symlinks=False)
            except OSError:
                yield f"its file {name} is missing"
                continue
            if [st.st_size, st.st_ino, st.st_mtime_ns] != info.get("stat"):
                yield f"its file {name} changed after it was sealed"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value, "image": self.image, "backend": self.backend,
                "memory_mib": self.memory_mib, "vcpus": self.vcpus, "display": self.display,
                "created": self.created, "build_s": self.build_s, "size": self.size, "vmm_version": self.vmm_version,
                "automation": self.automation or None, "key": self.key,
                "files": {n: {"size": f.get("size"), "sha256": f.get("sha256")} for n, f in self.files.items()}}


class TemplateStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        pool.attach(cfg)  # templates/ points into the workspace's pool where it has one
        self.dir = templates_dir(cfg)

    def list(self) -> list[Template]:
        if not self.dir.is_dir():
            return []
        return [Template.load(p) for p in sorted(self.dir.iterdir())
                if not p.name.startswith(".") and (p / META).is_file()]

    def find(self, kind: TemplateKind, name: str, *, automation: bool = False) -> Template | None:
        path = self.dir / key_of(kind, check_name(name, what="template name"), automation)
        return Template.load(path) if (path / META).is_file() else None

    def get(self, name: str) -> Template:
        """By name (a profile's template first, then an image's), or by key ("image-minimal"); either with
        AUTOMATION after it for an automation template ("chromium+automation")."""
        name, automation = split_name(name)
        for kind in TemplateKind:
            if name.startswith(f"{kind.value}-") and (t := self.find(kind, name[len(kind.value) + 1:],
                                                                      automation=automation)):
                return t
        for kind in TemplateKind:
            if (t := self.find(kind, name, automation=automation)) is not None:
                return t
        raise NotFound(f"no template named {name!r}",
                       hint="list templates with 'dispo template ls', make one with 'dispo template build NAME'")

    def remove(self, name: str) -> Template:
        t = self.get(name)
        backends.remove_tree(t.path)
        return t


# -- building ---------------------------------------------------------------------------------------
@dataclass
class Build:
    """A template being made inside a session's transaction."""

    kind: TemplateKind
    name: str
    tmp: Path
    entry: Any
    storage: StorageBackend
    automation: str = ""   # the protocol of its browser's debugging port ("" for none)


def begin(tx: Transaction, kind: TemplateKind, name: str, storage: StorageBackend, automation: str = "") -> Build:
    """The holder the state is saved into: recorded in the journal, then made (delete-before-create)."""
    d = templates_dir(tx.cfg)
    d.mkdir(mode=0o755, exist_ok=True)
    tmp = d / f".build-{tx.session_id}-{key_of(kind, name, bool(automation))}"
    be = backends.backend(storage)
    entry = tx.journal.record(be.undo_kind, path=str(tmp))
    if os.path.lexists(tmp):
        backends.remove_tree(tmp)
    be.make_holder(tmp)
    os.chmod(tmp, 0o700)  # the memory of a guest is as private as its disk
    return Build(kind, name, tmp, entry, storage, automation)


def put_disk(build: Build, disk: Path) -> None:
    """The session's disk into the template, while the guest is paused (a reflink where the workspace can)."""
    backends.backend(build.storage).put_file(disk, build.tmp / ROOTFS)


def finish(tx: Transaction, build: Build, image: Image, **meta: Any) -> Template:
    """Hash and record every file, seal, and put the template in place (replacing an older one)."""
    t0 = time.monotonic()
    entries: dict[str, dict[str, Any]] = {}
    for f in sorted(build.tmp.iterdir()):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o600)
            entries[f.name] = {"size": f.stat().st_size, "sha256": files.sha256_file(f)}
    doc: dict[str, Any] = {
        **meta, "format": FORMAT, "name": build.name, "kind": build.kind.value, "image": image.name,
        "image_sha256": image.sha256, "image_created": image.created, "agent": agent_hash(),
        "storage": build.storage.value, "created": time.time(),
        "automation": build.automation or None}
    for name, entry in entries.items():
        # size, inode, mtime: unchanged by the seal (a read-only flag or dropped write bits)
        st = os.stat(build.tmp / name, follow_symlinks=False)
        entry["stat"] = [st.st_size, st.st_ino, st.st_mtime_ns]
    doc["files"] = entries
    (build.tmp / META).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    backends.backend(build.storage).seal(build.tmp)
    final = templates_dir(tx.cfg) / key_of(build.kind, build.name, bool(build.automation))
    if os.path.lexists(final):  # a rebuild: the old one goes (sessions restored from it keep their copies)
        backends.remove_tree(final)
    try:
        os.rename(build.tmp, final)
    except OSError as e:
        raise StorageError(f"template {build.name!r} could not be put in place: {e.strerror}") from None
    tx.journal.forget(build.entry)
    log.info("template %s sealed in %.1f s (%s)", final.name, time.monotonic() - t0,
             format_size(sum(int(e["size"]) for e in entries.values())))
    return Template.load(final)


__all__ = ["AUTOMATION", "META", "Build", "Template", "TemplateKind", "TemplateStore", "agent_hash", "begin", "finish",
           "put_disk", "split_name", "templates_dir"]
