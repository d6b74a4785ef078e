"""`dispo image fetch`: the Firecracker CI kernel, root filesystem and SSH key the seed uses, as an image.

The artifacts live in a public bucket laid out as firecracker-ci/<folder>/<arch>/ where <folder> is
`v<major>.<minor>` (older) or a dated name (newer). Older folders hold `vmlinux-*`, `ubuntu-22.04.ext4` and
`ubuntu-22.04.id_rsa`; newer ones `ubuntu-24.04.squashfs` (converted here to ext4, with a fresh SSH key
installed for root). An S3 listing query (list-type=2) finds the newest folder and files.

Downloads go to <workspace>/cache/artifacts/<key>, resume from a `.part` file with an HTTP Range request,
and their sha256 is recorded at first download (upstream publishes none) and checked on every later use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from dispo import arch as arches
from dispo import kernels
from dispo.config import Config
from dispo.errors import FetchError, InvalidInput, NotFound, StorageError
from dispo.infra.proc import run
from dispo.infra.progress import Progress
from dispo.infra.txn import transaction
from dispo.names import check_name
from dispo.storage import files, treefs, workspace
from dispo.storage.images import Image, ImageStore, Provenance

log = logging.getLogger(__name__)

PREFIX = "firecracker-ci/"
CMDLINE = ("console=ttyS0", "reboot=k", "panic=1", "pci=off", "root=/dev/vda", "rw")
_CHUNK = 1 << 20
_S3 = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_KERNEL_RE = re.compile(r"^vmlinux-(\d+)\.(\d+)(?:\.(\d+))?$")
_ROOTFS_RE = re.compile(r"^ubuntu-(\d+)\.(\d+)\.(squashfs|ext4)$")
_VFOLDER_RE = re.compile(r"^v(\d+)\.(\d+)$")
_DATED_RE = re.compile(r"^(\d{8})")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Artifacts:
    folder: str              # e.g. "v1.10" or "20250612-abc123"
    kernel: str              # bucket keys
    rootfs: str
    ssh_key: str | None      # older folders publish a key; newer ones get a fresh one

    @property
    def squashfs(self) -> bool:
        return self.rootfs.endswith(".squashfs")


def host_arch() -> str:
    machine = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def check_kernel(kernel: Path, arch: str) -> None:
    """The bucket's `vmlinux-*` is what Firecracker boots on `arch`: an ELF vmlinux on x86_64, an uncompressed
    arm64 Image (despite its name) on aarch64."""
    if arch == "aarch64":
        kernels.check_arm64_image(kernel)
    else:
        kernels.check_vmlinux(kernel, arch)


# -- the bucket listing ----------------------------------------------------------------------------
def list_bucket(client: httpx.Client, base: str, prefix: str, delimiter: str | None = None
                ) -> tuple[list[str], list[str]]:
    """(keys, common prefixes) under `prefix`, following continuation tokens."""
    keys: list[str] = []
    prefixes: list[str] = []
    token: str | None = None
    while True:
        params = {"list-type": "2", "prefix": prefix}
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        try:
            resp = client.get(f"{base.rstrip('/')}/", params=params)
        except httpx.HTTPError as e:
            raise FetchError(f"cannot list {base} (prefix {prefix}): {e}") from None
        if resp.status_code != 200:
            raise FetchError(f"listing {base} (prefix {prefix}) failed with HTTP {resp.status_code}")
        try:
            root = ET.fromstring(resp.content)  # noqa: S314 - the bucket's own listing, no entities used
        except ET.ParseError as e:
            raise FetchError(f"listing of {base} is not S3 XML: {e}") from None
        ns = _S3 if root.tag.startswith(_S3) else ""
        keys += [k.text or "" for k in root.iter(f"{ns}Key")]
        prefixes += [p.text or "" for cp in root.iter(f"{ns}CommonPrefixes") for p in cp.iter(f"{ns}Prefix")]
        truncated = (root.findtext(f"{ns}IsTruncated") or "false").lower() == "true"
        token = root.findtext(f"{ns}NextContinuationToken")
        if not truncated or not token:
            return keys, prefixes


def _folder_rank(name: str) -> tuple[int, ...] | None:
    # Dated folders are the newer scheme: they outrank every v<major.minor> folder.
    if m := _DATED_RE.match(name):
        return (1, int(m.group(1)))
    if m := _VFOLDER_RE.match(name):
        return (0, int(m.group(1)), int(m.group(2)))
    return None


def _version(m: re.Match[str]) -> tuple[int, ...]:
    return tuple(int(g) for g in m.groups() if g is not None and g.isdigit())


def resolve(client: httpx.Client, base: str, arch: str, folder: str | None = None) -> Artifacts:
    """The newest (or the given) folder's newest kernel and root filesystem for `arch`."""
    if folder is None:
        _, prefixes = list_bucket(client, base, PREFIX, "/")
        ranked = sorted((r, name) for p in prefixes
                        if (r := _folder_rank(name := p[len(PREFIX):].strip("/"))) is not None)
        for _, name in reversed(ranked):
            try:
                return resolve(client, base, arch, name)
            except NotFound:
                continue  # a folder without this architecture: try the next newest
        raise NotFound(f"no firecracker-ci folder in {base} has artifacts for {arch}",
                       hint="pass --ci-version or check firecracker.artifacts_url")
    where = f"{PREFIX}{folder}/{arch}/"
    keys, _ = list_bucket(client, base, where)
    names = {k[len(where):]: k for k in keys if k.startswith(where) and "/" not in k[len(where):]}
    kernels_ = sorted((_version(m), n) for n in names if (m := _KERNEL_RE.match(n)))
    rootfses = sorted((_version(m), m.group(3) == "squashfs", n) for n in names if (m := _ROOTFS_RE.match(n)))
    if not kernels_ or not rootfses:
        raise NotFound(f"{base}/{where} has no vmlinux-* and ubuntu-*.(squashfs|ext4) for {arch}",
                       hint="pick another --ci-version")
    rootfs = rootfses[-1][2]
    stem = rootfs.rsplit(".", 1)[0]
    key = names.get(f"{stem}.id_rsa")
    return Artifacts(folder, names[kernels_[-1][1]], names[rootfs], key)


# -- downloads with resume and recorded hashes ------------------------------------------------------
class Cache:
    """<workspace>/cache/artifacts: downloaded files by bucket key, and the sha256 seen at first download."""

    def __init__(self, cfg: Config) -> None:
        self.root = cfg.workspace / "cache" / "artifacts"
        self.hashes_file = self.root / "sha256.json"

    def hashes(self) -> dict[str, dict[str, object]]:
        try:
            data: dict[str, dict[str, object]] = json.loads(self.hashes_file.read_text())
            return data
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise StorageError(f"{self.hashes_file} is damaged: {e}",
                               hint="remove it to trust the files anew") from None

    def record(self, url: str, digest: str, size: int) -> None:
        data = self.hashes()
        data[url] = {"sha256": digest, "size": size, "first_download": time.time()}
        tmp = self.hashes_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.hashes_file)

    def path(self, key: str) -> Path:
        if ".." in key.split("/"):
            raise InvalidInput(f"refusing bucket key {key!r}")
        return self.root / key

    def get(self, client: httpx.Client, url: str, key: str, progress: ProgressFn | None = None) -> Path:
        """The verified local copy of `url`: downloaded (or resumed) if needed, checked against its record."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        known = self.hashes().get(url)
        if dest.exists():
            digest = files.sha256_file(dest)
            if known is None or digest == known["sha256"]:
                if known is None:
                    self.record(url, digest, dest.stat().st_size)
                return dest
            log.warning("cached %s does not match its recorded sha256: downloading it again", dest)
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        download(client, url, part, progress)
        digest = files.sha256_file(part)
        if known is not None and digest != known["sha256"]:
            part.unlink()
            raise FetchError(f"{url} changed since its first download (sha256 {digest[:16]}…, "
                             f"recorded {str(known['sha256'])[:16]}…)",
                             hint=f"if the change is expected, remove its entry from {self.hashes_file}")
        os.replace(part, dest)
        if known is None:
            self.record(url, digest, dest.stat().st_size)
        return dest


def download(client: httpx.Client, url: str, part: Path, progress: ProgressFn | None = None) -> None:
    """Download `url` into `part`, resuming from what `part` already holds (HTTP Range)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 416:  # nothing left to fetch: the part is complete
                return
            if resp.status_code not in (200, 206):
                raise FetchError(f"download of {url} failed with HTTP {resp.status_code}")
            if resp.status_code == 200:
                have = 0  # the server ignored the range: start over
            total = have + int(resp.headers.get("content-length", "0") or 0)
            with open(part, "ab" if have else "wb") as f:
                done = have
                for chunk in resp.iter_bytes(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            if total and done != total:
                raise FetchError(f"download of {url} stopped at {done} of {total} bytes")
    except httpx.HTTPError as e:
        raise FetchError(f"download of {url} was interrupted: {e}") from None


# -- turning the artifacts into an image ------------------------------------------------------------
def squashfs_to_ext4(squashfs: Path, out: Path, pubkey: str, workdir: Path) -> None:
    """Unpack `squashfs`, authorize `pubkey` for root, and pack the tree as an ext4 image (no mount)."""
    tree = workdir / "tree"
    run(["unsquashfs", "-no-progress", "-f", "-d", tree, squashfs], hint="install squashfs-tools")
    # The unpacked tree is the download's: `root` may be a link to anywhere; treefs never follows one.
    treefs.write_file(tree, "root/.ssh/authorized_keys", pubkey.encode(), 0o600, dir_mode=0o700)
    used = sum(p.lstat().st_size for p in tree.rglob("*"))
    size_mib = max(256, int(used * 1.3) >> 20) + 256  # room for inodes, journal and some writes
    run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", tree, out, f"{size_mib}M"], hint="install e2fsprogs")
    shutil.rmtree(tree)


def new_ssh_key(directory: Path) -> tuple[Path, str]:
    key = directory / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dispo-image", "-f", key], hint="install openssh-client")
    return key, (directory / "id_ed25519.pub").read_text()


@contextlib.contextmanager
def _client(timeout: float = 30.0) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=timeout, follow_redirects=True) as c:
        yield c


def fetch_image(cfg: Config, name: str, *, base: str | None = None, arch: str | None = None,
                folder: str | None = None, quiet: bool = False) -> Image:
    """Download (or reuse) the newest CI kernel + rootfs (+ key) and import them as image `name`."""
    check_name(name, what="image name")
    store = ImageStore(cfg)
    if (cfg.images_dir / name).exists():
        raise InvalidInput(f"image {name!r} already exists", hint=f"remove it first with 'dispo image rm {name}'")
    base = (base or cfg.firecracker.artifacts_url).rstrip("/")
    # The bucket spells architectures the kernel's way (x86_64, aarch64); --arch arm64 means aarch64.
    arch = arches.get(arch).machine if arch else host_arch()
    workspace.ensure(cfg)
    cache = Cache(cfg)
    with _client() as client:
        art = resolve(client, base, arch, folder)
        log.info("fetching %s: %s, %s", art.folder, art.kernel, art.rootfs)

        def get(key: str) -> Path:
            return cache.get(client, f"{base}/{quote(key)}", key,
                             Progress(f"downloading {key.rsplit('/', 1)[-1]}", quiet=quiet))

        kernel, rootfs = get(art.kernel), get(art.rootfs)
        key_file = get(art.ssh_key) if art.ssh_key else None
    check_kernel(kernel, arch)
    with transaction(cfg, purpose=f"fetch image {name}") as tx:
        work = cfg.workspace / f".fetch-{tx.session_id}"
        tx.journal.record("path", path=str(work))
        work.mkdir(mode=0o700)
        if art.squashfs:
            key, pub = new_ssh_key(work)
            ext4 = work / "rootfs.ext4"
            squashfs_to_ext4(rootfs, ext4, pub, work)
        else:
            if key_file is None:
                raise NotFound(f"{art.rootfs} comes without an SSH key in {art.folder}",
                               hint="pick another --ci-version")
            key, ext4 = key_file, rootfs
        image = store.import_(
            ext4, name, quiet=quiet,
            extra_files={"vmlinux": kernel, "ssh_key": key},
            extra_meta={"kernel": "vmlinux", "cmdline": list(CMDLINE), "arch": arch, "vmms": ["firecracker"],
                        "ssh_key": "ssh_key", "ssh_user": "root",
                        "upstream": {"base": base, "folder": art.folder, "kernel": art.kernel,
                                     "rootfs": art.rootfs, "ssh_key": art.ssh_key}},
            tx=tx, provenance=Provenance.FETCHED)
    return image
