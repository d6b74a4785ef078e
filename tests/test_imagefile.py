"""Images by content: the digest `dispo image ls` shows, and `dispo image export`/`import` moving a sealed image to
another host (here: another workspace and state dir) as one file, checked by sha256 while it is read. The file is
hostile: every way out of the format is refused with one line, and nothing is left behind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dispo.config import Config, StorageBackend
from dispo.errors import InvalidInput, StorageError
from dispo.storage import imagefile
from dispo.storage.images import Image, ImageStore, Provenance, content_digest
from dispo.storage.layout import META, ROOTFS
from tests.worlds import dispo_env, host_objects, make_config, make_ext4, sha256

DISPO = [sys.executable, "-m", "dispo.cli.main"]
KERNEL = os.urandom(70_000)  # stands in for a kernel: any bytes; the rootfs is a real ext4


def _cfg(root: Path) -> Config:
    return make_config(root / "ws", root / "state", StorageBackend.COPY)


def _image(cfg: Config, tmp_path: Path, name: str = "base") -> Image:
    src = make_ext4(tmp_path / f"{name}.ext4", "8M", {"etc/hostname": "known-good\n", "data/a.txt": "a" * 5000})
    kernel, key = tmp_path / f"{name}.vmlinuz", tmp_path / f"{name}.key"
    kernel.write_bytes(KERNEL)
    key.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    return ImageStore(cfg).import_(
        src, name, quiet=True, extra_files={"vmlinuz": kernel, "ssh_key": key},
        extra_meta={"kernel": "vmlinuz", "cmdline": ["console=ttyS0", "quiet"], "arch": "x86_64",
                    "vmms": ["qemu"], "ssh_key": "ssh_key", "recipe": "minimal"},
        provenance=Provenance.BUILT)


def _saved(image: Image, *, compress: bool = False) -> bytes:
    out = io.BytesIO()
    imagefile.save(image, out, compress=compress)
    return out.getvalue()


def _nothing_left(cfg: Config) -> None:
    objs = host_objects(cfg.workspace, cfg.state_dir)
    assert objs["image_entries"] == set() and objs["journals"] == set(), objs


@pytest.fixture
def here(tmp_path: Path) -> Config:
    return _cfg(tmp_path / "here")


@pytest.fixture
def there(tmp_path: Path) -> Config:
    return _cfg(tmp_path / "there")


@pytest.fixture
def base(here: Config, tmp_path: Path) -> Image:
    return _image(here, tmp_path)


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "tar"])
def test_round_trip_gives_the_same_digest_and_a_usable_image(base: Image, there: Config, tmp_path: Path,
                                                             compress: bool) -> None:
    assert base.recorded_content is not None and base.digest == json.loads((base.path / META).read_text())["digest"]
    path = tmp_path / "base.dimg"
    imagefile.save_to_path(base, path, compress=compress)
    assert path.stat().st_mode & 0o077 == 0  # it carries a private key: the file is private too
    assert (path.read_bytes()[:4] == imagefile.ZSTD_MAGIC) is compress
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    with open(path, "rb") as f:
        loaded = imagefile.load(ImageStore(there), f, name="copy")
    assert loaded.digest == base.digest and loaded.sha256 == base.sha256 == sha256(base.rootfs)
    assert (loaded.name, loaded.kernel, loaded.cmdline, loaded.arch, loaded.vmms) == \
           ("copy", "vmlinuz", ("console=ttyS0", "quiet"), "x86_64", ("qemu",))
    assert loaded.provenance is Provenance.IMPORTED  # a file proves nothing about who made it
    assert (loaded.path / "vmlinuz").read_bytes() == KERNEL
    assert (loaded.path / "ssh_key").stat().st_mode & 0o077 == 0
    assert loaded.rootfs.stat().st_blocks * 512 < loaded.size  # the ext4's empty space stayed holes
    assert ImageStore(there).verify("copy")
    assert subprocess.run(["e2fsck", "-fn", loaded.rootfs], capture_output=True).returncode == 0


def test_ls_shows_the_digest(base: Image, here: Config, tmp_path: Path) -> None:
    conf = tmp_path / "dispo.toml"
    conf.write_text('[storage]\nbackend = "copy"\n')
    env = {**dispo_env(here.workspace, here.state_dir), "DISPO_CONFIG": str(conf)}
    short = subprocess.run([*DISPO, "image", "ls"], env=env, capture_output=True, text=True, check=True).stdout
    full = subprocess.run([*DISPO, "image", "ls", "--digests"], env=env, capture_output=True, text=True,
                          check=True).stdout
    assert short.splitlines()[0].split()[-1] == "SHA256"
    assert short.splitlines()[1].split()[-1] == base.digest[:12]
    assert full.splitlines()[1].split()[-1] == base.digest


def test_export_and_import_through_a_pipe(base: Image, here: Config, there: Config, tmp_path: Path) -> None:
    conf = tmp_path / "dispo.toml"
    conf.write_text('[storage]\nbackend = "copy"\n')
    src_env = {**dispo_env(here.workspace, here.state_dir), "DISPO_CONFIG": str(conf)}
    dst_env = {**dispo_env(there.workspace, there.state_dir), "DISPO_CONFIG": str(conf)}
    save = subprocess.Popen([*DISPO, "image", "export", "base", "-"], env=src_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    load = subprocess.run([*DISPO, "image", "import", "-", "--sha256", base.digest], env=dst_env, stdin=save.stdout,
                          capture_output=True, text=True, timeout=120)
    assert save.stdout is not None and save.stderr is not None
    save.stdout.close()
    assert save.wait(timeout=60) == 0 and base.digest in save.stderr.read().decode()
    assert load.returncode == 0, load.stderr
    assert "imported base: " in load.stdout and base.digest in load.stdout
    assert ImageStore(there).get("base").digest == base.digest


def test_a_wrong_sha256_is_refused_before_reading_and_in_one_line(base: Image, there: Config,
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "base.dimg"
    imagefile.save_to_path(base, path)
    conf = tmp_path / "dispo.toml"
    conf.write_text('[storage]\nbackend = "copy"\n')
    env = {**dispo_env(there.workspace, there.state_dir), "DISPO_CONFIG": str(conf)}
    proc = subprocess.run([*DISPO, "image", "load", str(path), "--sha256", "0" * 64], env=env, capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dispo: error: ") and base.digest in lines[0] and "(hint: " in lines[0]
    _nothing_left(there)


def _tamper(data: bytes, member: str, fn: Callable[[bytes], bytes]) -> bytes:
    """The saved tar with one member's bytes changed (same length, headers rewritten with valid checksums)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            body = src.extractfile(info)
            assert body is not None
            content = body.read()
            if info.name == member:
                content = fn(content)
                info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _refused(cfg: Config, data: bytes, *words: str, name: str | None = None) -> str:
    with pytest.raises(InvalidInput) as e:
        imagefile.load(ImageStore(cfg), io.BytesIO(data), name=name)
    line = e.value.one_line()
    assert "\n" not in line and "hint: " in line
    for w in words:
        assert w in line, line
    _nothing_left(cfg)
    return line


def test_a_tampered_file_is_refused_with_nothing_left(base: Image, there: Config, tmp_path: Path) -> None:
    data = _saved(base)
    # A byte of the root filesystem changed in transit: found while it is read, the half-loaded image undone.
    rootfs = _tamper(data, ROOTFS, lambda b: b[:2000] + bytes([b[2000] ^ 1]) + b[2001:])
    _refused(there, rootfs, "rootfs.ext4 does not match its sha256")
    # The manifest changed to match another rootfs: its digest is no longer the content's.
    def other_sha(b: bytes) -> bytes:
        doc = json.loads(b)
        doc["content"]["files"][-1]["sha256"] = "0" * 64
        return json.dumps(doc).encode()
    _refused(there, _tamper(data, imagefile.MANIFEST, other_sha), "not the digest of its content")
    # ... and its digest changed to match: the file is consistent, so only --sha256 tells it is not the image.
    def consistent(b: bytes) -> bytes:
        doc = json.loads(b)
        doc["content"]["meta"]["cmdline"] = ["init=/bin/sh"]
        doc["sha256"] = content_digest(doc["content"])
        return json.dumps(doc).encode()
    with pytest.raises(InvalidInput) as e:
        imagefile.load(ImageStore(there), io.BytesIO(_tamper(data, imagefile.MANIFEST, consistent)),
                       expect=base.digest)
    assert f"not the {base.digest} expected" in e.value.one_line()
    _nothing_left(there)
    # Cut short (a copy that did not finish), or with something after its end.
    _refused(there, data[:len(data) // 2], "ends too early")
    _refused(there, data + b"x" * 512, "follows its end")
    # Damaged zstd compression.
    z = tmp_path / "z.dimg"
    imagefile.save_to_path(base, z, compress=True)
    broken = bytearray(z.read_bytes())
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(InvalidInput):
        imagefile.load(ImageStore(there), io.BytesIO(bytes(broken)))
    _nothing_left(there)
    # Junk after the zstd frame: every file matched, but the image is not put in place.
    _refused(there, z.read_bytes() + b"junk" * 100, "zstd compression is damaged")


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        out = []
        for info in t.getmembers():
            f = t.extractfile(info)
            assert f is not None
            out.append((info, f.read()))
    return out


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for info, body in members:
            t.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_a_hostile_tar_is_refused_with_nothing_left(base: Image, there: Config, tmp_path: Path) -> None:
    good = _members(_saved(base))
    manifest, files = good[0], good[1:]
    last, body = files[-1]
    assert _tar(good) and imagefile.load(ImageStore(there), io.BytesIO(_tar(good)), name="ok").digest == base.digest
    ImageStore(there).remove("ok")
    evil = tmp_path / "evil"
    cases: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str]] = {
        "parent path": ([manifest, (_info("../evil", size=3), b"bad"), *files], "not a plain file name"),
        "absolute path": ([manifest, (_info(str(evil), size=3), b"bad"), *files], "not a plain file name"),
        "symlink": ([manifest, (_info(ROOTFS, tarfile.SYMTYPE, linkname="/etc/shadow"), b""), *files[1:]],
                    "symbolic link"),
        "hard link": ([manifest, (_info(ROOTFS, tarfile.LNKTYPE, linkname="/etc/shadow"), b""), *files[1:]],
                      "hard link"),
        "device": ([manifest, (_info("ssh_key", tarfile.CHRTYPE, devmajor="1", devminor="1"), b""), *files],
                   "character device"),
        "directory": ([(_info("sub", tarfile.DIRTYPE), b""), manifest, *files], "directory"),
        "manifest not first": ([*files, manifest], "first member is not manifest.json"),
        "unlisted member": ([manifest, (_info("extra", size=3), b"abc"), *files], "where the manifest has"),
        "member longer than the manifest says": (
            [manifest, *files[:-1], (_info(last.name, size=last.size + 512), body + bytes(512))],
            "its manifest says"),
        "extra member at the end": ([*good, (_info("zz", size=1), b"z")], "more members than its manifest lists"),
        "huge manifest": ([(_info(imagefile.MANIFEST, size=1 << 20), b" " * (1 << 20)), *files], "at most 65536"),
    }
    for what, (members, words) in cases.items():
        _refused(there, _tar(members), words)
        assert not evil.exists() and not (there.workspace / "evil").exists(), what
    # Extended headers (pax) and GNU long names: refused as such, never read whole.
    pax = _info(imagefile.MANIFEST, size=len(manifest[1]))
    pax.pax_headers = {"path": "../../etc/cron.d/evil"}
    _refused(there, _tar([(pax, manifest[1]), *files], tarfile.PAX_FORMAT), "extended header")
    first = _tar([manifest])[:512 + -(-len(manifest[1]) // 512) * 512]  # the manifest member, no end blocks
    _refused(there, first + _tar([(_info("a" * 200, size=1), b"a")], tarfile.GNU_FORMAT), "GNU long name")
    _refused(there, _tar(good, tarfile.GNU_FORMAT), "not POSIX ustar")
    # A manifest that is not one: junk, another format, unknown meta, a file named by the kernel that is missing.
    for body, words in [(b"\xff" * 100, "not JSON"), (b'{"format": "dispo-image/9"}', "format"),
                        (b"[]", "format")]:
        _refused(there, _tar([(_info(imagefile.MANIFEST, size=len(body)), body), *files]), words)
    doc = json.loads(manifest[1])
    one = doc["content"]["files"][0]
    changes: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda d: d["content"]["meta"].update(provenance="built"), "keys dispo does not know"),
        (lambda d: d["content"]["meta"].update(kernel="../../vmlinuz"), "names no file"),
        (lambda d: d["content"]["files"].append(dict(one, name="../x")), "invalid name"),
        (lambda d: d.update(name="../etc"), "no valid image name")]
    for change, words in changes:
        d = json.loads(json.dumps(doc))
        change(d)
        d["sha256"] = content_digest(d["content"])
        body = json.dumps(d).encode()
        _refused(there, _tar([(_info(imagefile.MANIFEST, size=len(body)), body), *files]), words)


def test_a_name_taken_is_refused_before_reading(base: Image, here: Config) -> None:
    with pytest.raises(InvalidInput) as e:
        imagefile.load(ImageStore(here), io.BytesIO(b""), name="base")
    assert "already exists" in e.value.one_line() and "dispo image rm base" in e.value.one_line()


def test_save_refuses_a_changed_image_and_leaves_no_file(base: Image, here: Config, tmp_path: Path) -> None:
    kernel = base.path / "vmlinuz"
    kernel.chmod(0o644)
    kernel.write_bytes(b"x" + KERNEL[1:])
    assert not ImageStore(here).verify("base")  # verify covers every file now, not the rootfs alone
    out = tmp_path / "out.dimg"
    with pytest.raises(StorageError) as e:
        imagefile.save_to_path(ImageStore(here).get("base"), out)
    assert "vmlinuz no longer matches" in e.value.one_line() and "dispo image verify base" in e.value.one_line()
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []


def test_an_image_sealed_before_manifests_gets_its_digest_from_its_files(base: Image, here: Config) -> None:
    meta = json.loads((base.path / META).read_text())
    recorded = meta.pop("digest")
    del meta["content"]
    (base.path / META).chmod(0o644)
    (base.path / META).write_text(json.dumps(meta))
    old = ImageStore(here).get("base")
    assert old.recorded_content is None and old.digest == recorded  # rootfs hash as recorded; small files hashed
    assert ImageStore(here).verify("base")


@pytest.mark.root
def test_round_trip_on_each_storage_backend(cfg: Config, tmp_path: Path) -> None:
    """Saved from a btrfs subvolume, a reflinked or a copied holder, loaded into one of the same backend: the same
    digest, sealed as an import is, and a session disk of it has the image's files."""
    from dispo.storage.disks import open_session
    from tests.worlds import debugfs_has

    image = _image(cfg, tmp_path)
    path = tmp_path / "base.dimg"
    imagefile.save_to_path(image, path)
    with open(path, "rb") as f:
        loaded = imagefile.load(ImageStore(cfg), f, name="again", expect=image.digest)
    assert loaded.digest == image.digest and loaded.storage is cfg.storage.backend
    if cfg.storage.backend is StorageBackend.BTRFS:
        with pytest.raises(OSError):
            (loaded.path / "new-file").write_text("x")  # a read-only subvolume
    else:
        assert all(f.stat().st_mode & 0o222 == 0 for f in loaded.path.iterdir())  # read-only files
    with open_session(cfg, image="again") as s:
        assert debugfs_has(s.disk, "/data/a.txt")
    assert ImageStore(cfg).verify("again")
    before = host_objects(cfg.workspace, cfg.state_dir)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-2048] ^= 1  # inside the last file
    with pytest.raises(InvalidInput):
        imagefile.load(ImageStore(cfg), io.BytesIO(bytes(data)), name="broken")
    assert host_objects(cfg.workspace, cfg.state_dir) == before  # the half-made holder (subvolume) is gone


def test_one_import_verb_tells_an_exported_image_from_a_raw_filesystem(base: Image, there: Config,
                                                                       tmp_path: Path) -> None:
    """`dispo image import FILE` takes an exported image whole (its name and sha256 come with it; `load` is the
    same verb); the raw-ext4 import and the exported-image reader each refuse the other's file in one line."""
    saved = tmp_path / "base.dimg"
    imagefile.save_to_path(base, saved)
    with pytest.raises(InvalidInput) as e:
        ImageStore(there).import_(saved, "x", quiet=True)
    assert f"import it whole with 'dispo image import {saved}'" in e.value.one_line()
    env = dispo_env(there.workspace, there.state_dir)
    for verb, name in (("import", "base"), ("load", "again")):
        p = subprocess.run([*DISPO, "image", verb, str(saved), *(["--name", name] if name != "base" else [])],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 0 and f"imported {name}: " in p.stdout and base.digest in p.stdout, p.stderr
    p = subprocess.run([*DISPO, "image", "import", str(saved), "--size", "1G"], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 1 and "--size is for a raw ext4 file" in p.stderr, p.stderr
    for name in ("base", "again"):
        ImageStore(there).remove(name)
    raw = make_ext4(tmp_path / "raw.ext4", "8M")
    with open(raw, "rb") as f, pytest.raises(InvalidInput) as e:
        imagefile.load(ImageStore(there), f)
    assert "dispo image import FILE --name NAME" in e.value.one_line()
    _nothing_left(there)
