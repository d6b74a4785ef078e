"""`dispo image fetch` against a local server laid out like the artifacts bucket (both layouts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dispo.config import Config, StorageBackend
from dispo.errors import FetchError, NotFound
from dispo.fetch import Cache, fetch_image, resolve
from dispo.storage.images import ImageStore
from tests.fcworld import tiny_elf
from tests.s3world import Bucket, serve
from tests.worlds import make_config, sh

pytestmark = pytest.mark.skipif(shutil.which("mksquashfs") is None or shutil.which("ssh-keygen") is None,
                                reason="needs squashfs-tools and openssh-client")
CI = "firecracker-ci"
DATED = "20250612-1a2b3c4"


def build_bucket(root: Path, tmp: Path) -> Bucket:
    def put(key: str, src: Path | bytes) -> None:
        dest = root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)

    kernel = tiny_elf(tmp / "k.elf")
    # Older layout: ext4 + the key that goes with it.
    keydir = tmp / "oldkey"
    keydir.mkdir()
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keydir / "id_rsa")
    old = tmp / "old.root"
    (old / "root" / ".ssh").mkdir(parents=True)
    (old / "root" / ".ssh" / "authorized_keys").write_text((keydir / "id_rsa.pub").read_text())
    (old / "etc").mkdir()
    (old / "etc" / "hostname").write_text("ubuntu-fc-uvm\n")
    sh("mkfs.ext4", "-q", "-F", "-d", old, tmp / "old.ext4", "24M")
    for v in ("v1.9", "v1.10"):
        put(f"{CI}/{v}/x86_64/vmlinux-5.10.223", kernel)
        put(f"{CI}/{v}/x86_64/vmlinux-6.1.102", kernel)
        put(f"{CI}/{v}/x86_64/vmlinux-6.1.102.config", b"CONFIG_X=y\n")
        put(f"{CI}/{v}/x86_64/ubuntu-22.04.ext4", tmp / "old.ext4")
        put(f"{CI}/{v}/x86_64/ubuntu-22.04.id_rsa", keydir / "id_rsa")
        put(f"{CI}/{v}/x86_64/ubuntu-22.04.id_rsa.pub", keydir / "id_rsa.pub")
    # Newer layout: a squashfs, no key.
    new = tmp / "new.root"
    (new / "root").mkdir(parents=True)
    (new / "etc").mkdir()
    (new / "etc" / "hostname").write_text("ubuntu-2404\n")
    sh("mksquashfs", new, tmp / "new.squashfs", "-quiet", "-noappend", "-comp", "gzip")
    for folder in ("v1.13", DATED):
        put(f"{CI}/{folder}/x86_64/vmlinux-6.1.141", kernel)
        put(f"{CI}/{folder}/x86_64/vmlinux-6.1.99", kernel)
        put(f"{CI}/{folder}/x86_64/ubuntu-24.04.squashfs", tmp / "new.squashfs")
    # The newest folder has no x86_64 artifacts at all: the resolver must look past it.
    put(f"{CI}/20251101-ffffff/aarch64/vmlinux-6.1.141", kernel)
    put(f"{CI}/20251101-ffffff/aarch64/ubuntu-24.04.squashfs", tmp / "new.squashfs")
    put(f"{CI}/README", b"not a folder\n")
    return Bucket(root)


@pytest.fixture
def bucket(tmp_path: Path) -> Bucket:
    return build_bucket(tmp_path / "bucket", tmp_path)


@pytest.fixture
def base(bucket: Bucket) -> Iterator[str]:
    with serve(bucket) as url:
        yield url


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path / "ws", tmp_path / "st", StorageBackend.COPY)


def test_resolve_finds_the_newest_folder_and_files(base: str, bucket: Bucket) -> None:
    with httpx.Client() as c:
        art = resolve(c, base, "x86_64")
        assert (art.folder, art.kernel, art.rootfs, art.ssh_key) == (
            DATED, f"{CI}/{DATED}/x86_64/vmlinux-6.1.141", f"{CI}/{DATED}/x86_64/ubuntu-24.04.squashfs", None)
        old = resolve(c, base, "x86_64", "v1.10")
        assert old.kernel.endswith("vmlinux-6.1.102") and old.rootfs.endswith("ubuntu-22.04.ext4")
        assert old.ssh_key == f"{CI}/v1.10/x86_64/ubuntu-22.04.id_rsa"
        assert resolve(c, base, "aarch64").folder == "20251101-ffffff"
        with pytest.raises(NotFound):
            resolve(c, base, "riscv64")
    # The listing really paged (page size 3) and used the delimiter for folders.
    assert any("continuation-token" in q for q, _ in bucket.log)
    assert any("delimiter=%2F" in q for q, _ in bucket.log)


def _debugfs_cat(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True).stdout


@pytest.mark.root
def test_fetch_newer_layout_converts_squashfs_and_installs_a_fresh_key(cfg: Config, base: str,
                                                                      tmp_path: Path) -> None:
    image = fetch_image(cfg, "fc-ci", base=base, arch="x86_64", quiet=True)
    assert image.kernel == "vmlinux" and image.kernel_path is not None
    assert image.kernel_path.read_bytes()[:4] == b"\x7fELF"
    assert image.vmms == ("firecracker",) and "root=/dev/vda" in image.cmdline
    assert _debugfs_cat(image.rootfs, "/etc/hostname") == "ubuntu-2404\n"
    # A user of the key copies it out with 0600 (ssh refuses a sealed image's 0444 file).
    key = tmp_path / "key"
    shutil.copyfile(image.path / "ssh_key", key)
    key.chmod(0o600)
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                         text=True, check=True).stdout.split()[:2]
    assert _debugfs_cat(image.rootfs, "/root/.ssh/authorized_keys").split()[:2] == pub
    meta = json.loads((image.path / "image.json").read_text())
    assert meta["upstream"]["folder"] == DATED
    # Nothing but the image and the download cache is left in the workspace.
    assert sorted(p.name for p in cfg.workspace.iterdir() if p.name.startswith(".fetch")) == []
    assert not (cfg.state_dir / "sessions").exists() or list((cfg.state_dir / "sessions").iterdir()) == []


@pytest.mark.root
def test_fetch_older_layout_uses_the_published_key(cfg: Config, base: str, bucket: Bucket) -> None:
    image = fetch_image(cfg, "fc-old", base=base, arch="x86_64", folder="v1.10", quiet=True)
    assert (image.path / "ssh_key").read_bytes() == (bucket.root / CI / "v1.10/x86_64/ubuntu-22.04.id_rsa").read_bytes()
    assert _debugfs_cat(image.rootfs, "/etc/hostname") == "ubuntu-fc-uvm\n"
    assert ImageStore(cfg).verify("fc-old")


def test_download_resumes_with_a_range_request(cfg: Config, base: str, bucket: Bucket) -> None:
    key = f"{CI}/v1.10/x86_64/ubuntu-22.04.ext4"
    size = (bucket.root / key).stat().st_size
    cache = Cache(cfg)
    bucket.cut_after = size // 3
    with httpx.Client() as c:
        with pytest.raises(FetchError, match=r"interrupted|stopped at") as e:
            cache.get(c, f"{base}/{key}", key)
        assert "\n" not in e.value.one_line()
        part = cache.path(key).with_name(cache.path(key).name + ".part")
        assert part.stat().st_size == size // 3
        seen: list[tuple[int, int]] = []
        path = cache.get(c, f"{base}/{key}", key, lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == (bucket.root / key).read_bytes()
    assert bucket.log[-1] == (f"/{key}", f"bytes={size // 3}-")
    assert seen[-1] == (size, size), "progress counts the resumed bytes too"
    assert not part.exists()


def test_sha256_is_recorded_then_verified(cfg: Config, base: str, bucket: Bucket) -> None:
    key = f"{CI}/v1.10/x86_64/vmlinux-6.1.102"
    url = f"{base}/{key}"
    cache = Cache(cfg)
    with httpx.Client() as c:
        path = cache.get(c, url, key)
        recorded = cache.hashes()[url]["sha256"]
        assert recorded == sh("sha256sum", path).stdout.split()[0]
        # A damaged cached copy is noticed on the next use and fetched again.
        path.write_bytes(b"bit rot")
        assert cache.get(c, url, key).read_bytes() == (bucket.root / key).read_bytes()
        # Upstream changing the file after the first download is refused, and nothing is kept.
        (bucket.root / key).write_bytes(b"\x7fELF something else entirely")
        path.unlink()
        with pytest.raises(FetchError, match="changed since its first download"):
            cache.get(c, url, key)
        assert not path.exists()
        assert cache.hashes()[url]["sha256"] == recorded


def test_unreachable_server_is_a_one_line_error(cfg: Config) -> None:
    with pytest.raises(FetchError) as e:
        fetch_image(cfg, "x", base="http://127.0.0.1:9", arch="x86_64", quiet=True)
    assert "\n" not in e.value.one_line() and "cannot list" in e.value.one_line()
    assert not (cfg.images_dir / "x").exists()


@pytest.mark.root
def test_cli_image_fetch(cfg: Config, base: str, tmp_path: Path) -> None:
    from tests.worlds import dispo_env

    env = dispo_env(cfg.workspace, cfg.state_dir)
    cfgfile = tmp_path / "dispo.toml"
    cfgfile.write_text(f'[storage]\nbackend = "copy"\n[firecracker]\nartifacts_url = "{base}"\n')
    env["DISPO_CONFIG"] = str(cfgfile)
    out = subprocess.run([sys.executable, "-m", "dispo", "image", "fetch", "--name", "ci", "--ci-version", "v1.13",
                          "--quiet"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fetched ci" in out.stdout and "v1.13" in out.stdout
    again = subprocess.run([sys.executable, "-m", "dispo", "image", "fetch", "--name", "ci"], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
