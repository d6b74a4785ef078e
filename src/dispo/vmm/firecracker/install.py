"""`dispo firecracker install`: an official release tarball, checked, into <workspace>/bin.

A release is `firecracker-v<V>-<arch>.tgz` holding release-v<V>-<arch>/ with firecracker-v<V>-<arch>,
jailer-v<V>-<arch> and SHA256SUMS; GitHub also publishes `<tgz>.sha256.txt` beside it. Both sums are
checked when present; the binaries must also report the expected version before they are put in place.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from dispo.config import Config
from dispo.errors import InstallError, InvalidInput
from dispo.infra.progress import Progress
from dispo.vmm.firecracker.binaries import install_dir, version_of

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


@dataclass(frozen=True)
class Installed:
    version: str
    firecracker: Path
    jailer: Path | None
    url: str


def _get(client: httpx.Client, url: str, *, optional: bool = False, quiet: bool = True) -> bytes | None:
    try:
        with client.stream("GET", url) as resp:
            if resp.status_code == 404 and optional:
                return None
            if resp.status_code != 200:
                raise InstallError(f"download of {url} failed with HTTP {resp.status_code}")
            total = int(resp.headers.get("content-length", "0") or 0)
            buf = io.BytesIO()
            progress = Progress(f"downloading {url.rsplit('/', 1)[-1]}", quiet=quiet)
            for chunk in resp.iter_bytes(1 << 20):
                buf.write(chunk)
                progress(buf.tell(), total)
            return buf.getvalue()
    except httpx.HTTPError as e:
        raise InstallError(f"download of {url} failed: {e}") from None


def _sums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            out[parts[1].lstrip("*").rsplit("/", 1)[-1]] = parts[0].lower()
    return out


def install(cfg: Config, version: str, *, url: str | None = None, arch: str | None = None,
            quiet: bool = False) -> Installed:
    """Download, verify and install firecracker (and jailer) `version` into <workspace>/bin."""
    if not _VERSION_RE.match(version):
        raise InvalidInput(f"invalid firecracker version {version!r}", hint="give a version such as 1.7.0")
    arch = arch or os.uname().machine
    url = (url or cfg.firecracker.release_url).format(version=version, arch=arch)
    stem = f"firecracker-v{version}-{arch}"
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        tgz = _get(client, url, quiet=quiet)
        assert tgz is not None
        outer = _get(client, url + ".sha256.txt", optional=True)
    digest = hashlib.sha256(tgz).hexdigest()
    if outer is not None and digest not in outer.decode(errors="replace"):
        raise InstallError(f"{url} does not match its published sha256", hint="the download is damaged: try again")
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            blobs = _verified_binaries(tar, url, stem, version, arch)
    except tarfile.TarError as e:
        raise InstallError(f"{url} is not a release tarball: {e}") from None
    dest_dir = install_dir(cfg)
    dest_dir.mkdir(parents=True, exist_ok=True)
    placed: dict[str, Path] = {}
    staged: list[Path] = []
    try:
        for name, data in blobs.items():
            tmp = dest_dir / f".{name}.new-{os.getpid()}"
            staged.append(tmp)
            tmp.write_bytes(data)
            tmp.chmod(0o755)
            got = version_of(tmp)
            if got != version:
                raise InstallError(f"{name} from {url} reports version {got}, not {version}")
        for name, tmp in zip(blobs, staged, strict=True):
            os.replace(tmp, dest_dir / name)
            placed[name] = dest_dir / name
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    version_of.cache_clear()
    return Installed(version, placed["firecracker"], placed.get("jailer"), url)


def _verified_binaries(tar: tarfile.TarFile, url: str, stem: str, version: str, arch: str) -> dict[str, bytes]:
    """firecracker (and jailer) from the tarball, each matching the release's SHA256SUMS."""
    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
    if "SHA256SUMS" not in members or stem not in members:
        raise InstallError(f"{url} holds no {stem} and SHA256SUMS",
                           hint="is this an official firecracker release for this architecture?")
    sums = _sums(_read(tar, members["SHA256SUMS"]).decode(errors="replace"))
    blobs: dict[str, bytes] = {}
    for name, member in {"firecracker": stem, "jailer": f"jailer-v{version}-{arch}"}.items():
        if member not in members:
            continue
        data = _read(tar, members[member])
        if sums.get(member) != hashlib.sha256(data).hexdigest():
            raise InstallError(f"{member} in {url} does not match the release's SHA256SUMS")
        blobs[name] = data
    return blobs


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise InstallError(f"cannot read {member.name} from the release tarball")
    return f.read()
