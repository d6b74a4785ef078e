"""Images and per-session disks on real filesystems: btrfs snapshots, reflinks, plain copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dispo.config import Config, StorageBackend
from dispo.errors import InvalidInput, NotFound, PermissionProblem, StorageError
from dispo.infra.txn import transaction
from dispo.storage import backends, layout
from dispo.storage import images as images_mod
from dispo.storage.disks import clone_template, open_session
from dispo.storage.images import ImageStore
from dispo.storage.templates import Template, TemplateKind
from tests.worlds import (
    debugfs_has,
    debugfs_write,
    host_objects,
    is_mounted,
    loop_devices_for,
    loop_fs,
    make_config,
    make_ext4,
    sh,
    sha256,
)

pytestmark = pytest.mark.root


def _shared_extents(path: Path) -> bool:
    """Whether any extent of the file is shared with another file (FIEMAP 'shared' flag)."""
    out = sh("filefrag", "-v", path).stdout
    return "shared" in out


def test_session_disk_is_private_and_discarded(cfg: Config, src_image: Path, tmp_path: Path) -> None:
    store = ImageStore(cfg)
    image = store.import_(src_image, "base", quiet=True)
    assert image.storage is cfg.storage.backend
    digest = sha256(image.rootfs)
    assert digest == image.sha256 == sha256(src_image)
    before = host_objects(cfg.workspace, cfg.state_dir)

    note = tmp_path / "note.txt"
    note.write_text("written in the session\n")
    with open_session(cfg, image="base", name="t1") as s:
        assert s.disk.parent.name == s.session_id  # named with the session id
        assert s.disk.stat().st_size == image.size
        # Private to root on every backend (a btrfs snapshot used to keep the image's 0755/0444).
        assert s.disk.parent.stat().st_mode & 0o077 == 0 and s.disk.stat().st_mode & 0o077 == 0
        if cfg.storage.backend is StorageBackend.BTRFS:
            def field(path: Path, name: str) -> str:
                out = sh("btrfs", "subvolume", "show", path).stdout
                return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.strip().startswith(name))

            assert field(s.disk.parent, "Parent UUID:") == field(image.path, "UUID:")  # a real snapshot
        elif cfg.storage.backend is StorageBackend.REFLINK:
            assert _shared_extents(s.disk)  # a real reflink, not a copy
        else:
            assert not _shared_extents(s.disk)
        debugfs_write(s.disk, note, "/session-note.txt")
        assert debugfs_has(s.disk, "/session-note.txt")
        assert not debugfs_has(image.rootfs, "/session-note.txt")
        during = host_objects(cfg.workspace, cfg.state_dir)
        assert during["session_disks"] == {s.session_id}
        assert during["journals"] == {s.session_id}
    after = host_objects(cfg.workspace, cfg.state_dir)
    assert after == before
    assert sha256(image.rootfs) == digest
    assert store.verify("base")
    with open_session(cfg, image="base") as s2:
        assert not debugfs_has(s2.disk, "/session-note.txt")  # the next session starts clean


def test_image_is_sealed(cfg: Config, src_image: Path) -> None:
    image = ImageStore(cfg).import_(src_image, "base", quiet=True)
    if cfg.storage.backend is StorageBackend.BTRFS:
        assert sh("btrfs", "property", "get", "-ts", image.path, "ro").stdout.strip() == "ro=true"
        with pytest.raises(OSError):
            (image.path / "new-file").write_text("x")  # even root cannot write a read-only subvolume
    else:
        assert oct(image.rootfs.stat().st_mode & 0o777) == "0o444"


def test_import_grows_offline(cfg: Config, src_image: Path) -> None:
    image = ImageStore(cfg).import_(src_image, "big", 96 << 20, quiet=True)
    assert image.size == 96 << 20
    assert image.rootfs.stat().st_blocks * 512 < 96 << 20  # grown sparsely
    blocks = sh("dumpe2fs", "-h", image.rootfs).stdout
    count = int(next(ln for ln in blocks.splitlines() if ln.startswith("Block count:")).split()[-1])
    bsize = int(next(ln for ln in blocks.splitlines() if ln.startswith("Block size:")).split()[-1])
    assert count * bsize == 96 << 20
    assert sh("e2fsck", "-fn", image.rootfs, check=False).returncode == 0
    assert debugfs_has(image.rootfs, "/etc/hostname")


def test_image_ls_rm(cfg: Config, src_image: Path) -> None:
    store = ImageStore(cfg)
    store.import_(src_image, "one", quiet=True)
    store.import_(src_image, "two", quiet=True)
    assert [i.name for i in store.list()] == ["one", "two"]
    store.remove("one")
    assert [i.name for i in store.list()] == ["two"]
    assert host_objects(cfg.workspace, cfg.state_dir)["image_entries"] == {"two"}
    with pytest.raises(NotFound) as e:
        store.remove("one")
    assert "hint: list images with 'dispo image ls'" in e.value.one_line()


@pytest.mark.parametrize("bad", ["a/b", "../x", "..", "a b", "x;reboot", "$(id)", "a|b"])
def test_bad_image_names_leave_nothing(cfg: Config, src_image: Path, bad: str) -> None:
    before = host_objects(cfg.workspace, cfg.state_dir)
    with pytest.raises(InvalidInput, match="invalid image name"):
        ImageStore(cfg).import_(src_image, bad, quiet=True)
    assert host_objects(cfg.workspace, cfg.state_dir) == before
    assert not (cfg.workspace.parent / "x").exists()


def test_bad_inputs_leave_nothing(cfg: Config, src_image: Path, tmp_path: Path) -> None:
    store = ImageStore(cfg)
    store.import_(src_image, "base", quiet=True)
    before = host_objects(cfg.workspace, cfg.state_dir)
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    with pytest.raises(NotFound, match="does not exist"):
        store.import_(tmp_path / "missing.ext4", "m", quiet=True)
    with pytest.raises(InvalidInput, match="not an ext4 filesystem"):
        store.import_(junk, "junk", quiet=True)
    with pytest.raises(InvalidInput, match="is a directory"):
        store.import_(tmp_path, "dir", quiet=True)
    with pytest.raises(InvalidInput, match="smaller than the image"):
        store.import_(src_image, "small", 16 << 20, quiet=True)
    with pytest.raises(InvalidInput, match="already exists"):
        store.import_(src_image, "base", quiet=True)
    with pytest.raises(NotFound, match="image 'nope' not found"), open_session(cfg, image="nope"):
        pass
    with pytest.raises(InvalidInput, match="invalid session name"), open_session(cfg, image="base", name="../evil"):
        pass
    assert host_objects(cfg.workspace, cfg.state_dir) == before


def test_failed_import_leaves_nothing(cfg: Config, src_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the holder exists (here: the grow step) is unwound by the journal."""
    before = host_objects(cfg.workspace, cfg.state_dir)

    def broken_grow(path: Path, size: int) -> None:
        assert path.exists()  # the half-made image exists at this point
        raise StorageError("simulated failure while growing")

    monkeypatch.setattr(images_mod, "grow_ext4", broken_grow)
    with pytest.raises(StorageError, match="simulated"):
        ImageStore(cfg).import_(src_image, "half", 64 << 20, quiet=True)
    after = host_objects(cfg.workspace, cfg.state_dir)
    # The layout dirs may now exist (they did not before the first import); nothing else does.
    assert after["image_entries"] == before["image_entries"] == set()
    assert after["journals"] == set() and after["subvolumes"] == set()


def test_damaged_filesystem_is_refused_on_grow(cfg: Config, src_image: Path) -> None:
    with open(src_image, "r+b") as f:  # wreck the block group descriptors, keep the magic
        f.seek(4096)
        f.write(b"\xff" * 4096)
    with pytest.raises(Exception, match="e2fsck"):
        ImageStore(cfg).import_(src_image, "broken", 64 << 20, quiet=True)
    assert host_objects(cfg.workspace, cfg.state_dir)["image_entries"] == set()


def test_read_only_workspace(tmp_path: Path, src_image: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "ro,size=16m", "tmpfs", ro)
    try:
        cfg = make_config(ro / "dispo", tmp_path / "state")
        with pytest.raises(PermissionProblem, match="read-only filesystem"):
            ImageStore(cfg).import_(src_image, "base", quiet=True)
        assert list(ro.iterdir()) == []
        assert not (tmp_path / "state" / "sessions").exists() or not any((tmp_path / "state" / "sessions").iterdir())
    finally:
        sh("umount", ro)


def test_forced_backend_checked(tmp_path: Path, src_image: Path, ext4_mnt: Path) -> None:
    cfg = make_config(ext4_mnt / "dispo", tmp_path / "state", StorageBackend.BTRFS)
    with pytest.raises(StorageError, match="not on btrfs"):
        ImageStore(cfg).import_(src_image, "base", quiet=True)
    cfg = make_config(ext4_mnt / "dispo", tmp_path / "state", StorageBackend.REFLINK)
    with pytest.raises(StorageError, match="does not support reflinks"):
        ImageStore(cfg).import_(src_image, "base", quiet=True)


def test_probe_picks_the_best_backend(btrfs_mnt: Path, xfs_mnt: Path, ext4_mnt: Path, tmp_path: Path) -> None:
    assert backends.probe(btrfs_mnt) is StorageBackend.BTRFS
    assert backends.probe(xfs_mnt) is StorageBackend.REFLINK
    assert backends.probe(ext4_mnt) is StorageBackend.COPY


def test_reflink_on_xfs(xfs_mnt: Path, src_image: Path, tmp_path: Path) -> None:
    cfg = make_config(xfs_mnt / "dispo", tmp_path / "state")
    image = ImageStore(cfg).import_(src_image, "base", quiet=True)
    assert image.storage is StorageBackend.REFLINK
    with open_session(cfg, image="base") as s:
        assert _shared_extents(s.disk)
        debugfs_write(s.disk, src_image.with_suffix(".root") / "etc" / "hostname", "/x")
    assert sha256(image.rootfs) == image.sha256
    assert host_objects(cfg.workspace, cfg.state_dir)["session_disks"] == set()


def test_copy_backend_on_tmpfs(tmp_path: Path, src_image: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", mnt)
    try:
        cfg = make_config(mnt / "dispo", tmp_path / "state")
        image = ImageStore(cfg).import_(src_image, "base", quiet=True)
        assert image.storage is StorageBackend.COPY
        with open_session(cfg, image="base") as s:
            debugfs_write(s.disk, src_image.with_suffix(".root") / "etc" / "hostname", "/x")
            assert debugfs_has(s.disk, "/x")
        assert sha256(image.rootfs) == image.sha256
        assert not debugfs_has(image.rootfs, "/x")
        assert list((mnt / "dispo" / "sessions").iterdir()) == []
    finally:
        sh("umount", mnt)


def test_loop_fs_cleans_up_even_when_the_test_fails(tmp_path: Path) -> None:
    backing = tmp_path / "w" / "btrfs.img"
    mnt = tmp_path / "w" / "mnt"
    with pytest.raises(RuntimeError, match="boom"), loop_fs(tmp_path / "w", "btrfs", "256M") as m:
        assert is_mounted(m) and loop_devices_for(backing)
        (m / "f").write_text("x")
        raise RuntimeError("boom")
    assert not is_mounted(mnt)
    assert loop_devices_for(backing) == []
    assert not backing.exists()


def test_private_extra_file_stays_private(cfg: Config, src_image: Path, tmp_path: Path) -> None:
    key = tmp_path / "id_key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x7fELF" + b"\0" * 100)
    image = ImageStore(cfg).import_(src_image, "keyed", quiet=True, extra_files={"ssh_key": key, "vmlinuz": kernel},
                                    extra_meta={"kernel": "vmlinuz"})
    assert (image.path / "ssh_key").stat().st_mode & 0o077 == 0  # not readable by group or others
    assert (image.path / "ssh_key").read_text() == key.read_text()
    assert image.kernel_path is not None and image.kernel_path.read_bytes() == kernel.read_bytes()
    with pytest.raises(InvalidInput, match="invalid extra image file name"):
        ImageStore(cfg).import_(src_image, "bad", quiet=True, extra_files={"../x": key})
    assert not (cfg.images_dir / "bad").exists()


def test_image_metadata(cfg: Config, src_image: Path) -> None:
    image = ImageStore(cfg).import_(src_image, "meta", quiet=True)
    meta = json.loads((image.path / layout.META).read_text())
    assert meta["name"] == "meta" and meta["sha256"] == image.sha256 and meta["storage"] == cfg.storage.backend.value
    assert meta["source"] == str(src_image)


def test_make_ext4_helper(tmp_path: Path) -> None:
    img = make_ext4(tmp_path / "x.ext4", "8M", {"a/b.txt": "hello"})
    assert debugfs_has(img, "/a/b.txt")


def test_remove_tree_never_follows_a_link(cfg: Config, src_image: Path) -> None:
    """A link where a session disk is expected (planted, or left by a bug) pointing at an image: removing the
    "disk" removes the link, never the subvolume or directory behind it."""
    image = ImageStore(cfg).import_(src_image, "base", quiet=True)
    link = cfg.disks_dir / "0badc0de"
    link.symlink_to(image.path)
    backends.remove_tree(link)
    assert not os.path.lexists(link)
    assert image.rootfs.is_file() and sha256(image.rootfs) == image.sha256


def test_a_clone_of_a_template_gets_its_disk_alone_as_a_reflink_on_btrfs(cfg: Config, src_image: Path) -> None:
    """A restore's disk: the template's rootfs only, private to root, never a snapshot of the template's holder
    (on btrfs that commits the filesystem's transaction and copies the memory files too); nothing left after."""
    image = ImageStore(cfg).import_(src_image, "base", quiet=True)
    # The image's holder stands in for a template's: a subvolume on btrfs, its rootfs and a file beside it.
    t = Template(name="base", kind=TemplateKind.IMAGE, path=image.path, image="base", image_sha256=image.sha256,
                 image_created=0.0, backend="qemu", memory_mib=512, vcpus=1, shm_mib=0, display="none", mac="",
                 created=0.0, agent="", storage=image.storage)
    digest = sha256(image.rootfs)
    before = host_objects(cfg.workspace, cfg.state_dir)
    with transaction(cfg, purpose="session", image="base") as tx:
        disk_dir = clone_template(tx, t)
        assert [f.name for f in disk_dir.iterdir()] == [layout.ROOTFS]
        assert disk_dir.stat().st_mode & 0o777 == 0o700 and (disk_dir / layout.ROOTFS).stat().st_mode & 0o777 == 0o600
        assert not backends.is_subvolume(disk_dir)
        assert _shared_extents(disk_dir / layout.ROOTFS) == (cfg.storage.backend is not StorageBackend.COPY)
        with open(disk_dir / layout.ROOTFS, "r+b") as f:
            f.write(b"clone")
    assert sha256(image.rootfs) == digest
    assert host_objects(cfg.workspace, cfg.state_dir) == before
