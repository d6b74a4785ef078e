"""Image builds: the host's apt sources, the recipe's cache key, a failed build leaving nothing, a real build."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dispo import guest
from dispo.config import Config
from dispo.errors import CommandError, InvalidInput
from dispo.imagebuild import (
    INITRD,
    KERNEL,
    Product,
    build_image,
    build_product,
    cache_dir,
    import_product,
    into,
    recipes,
    sources,
)
from dispo.imagebuild.undoers import mounts_under
from dispo.infra import undo
from dispo.storage.images import ImageStore, Provenance
from tests.worlds import make_config, sh

DEB822 = """\
Types: deb deb-src
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates trixie
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def etc_apt(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).write_text(text)
    return root


def test_deb822_sources_for_suite(tmp_path: Path) -> None:
    found = sources.for_suite("bookworm", etc_apt(tmp_path, {"sources.list.d/debian.sources": DEB822}))
    assert [(s.uri, s.suites, s.components) for s in found] == [
        ("http://mirror.example/debian", ("bookworm", "bookworm-updates"), ("main",)),
        ("http://security.example/debian-security", ("bookworm-security",), ("main",)),
    ]
    assert found[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    text = sources.deb822_text(found)
    assert "trixie" not in text and "disabled.example" not in text and "contrib" not in text


def test_one_line_sources_and_ignored_files(tmp_path: Path) -> None:
    apt = etc_apt(tmp_path, {
        "sources.list": "# deb http://commented.example/debian bookworm main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main non-free\n"
                        "deb-src http://src.example/debian bookworm main\n",
        # apt reads only *.list and *.sources; a renamed file is switched off
        "sources.list.d/other.list.disabled-by-someone": "deb http://off.example/debian bookworm main\n",
        "sources.list.d/third.list": "deb https://third.example/apt cloud-sdk-bookworm main\n",
    })
    found = sources.for_suite("bookworm", apt)
    assert [(s.uri, s.suites, s.signed_by) for s in found] == [("http://one.example/debian", ("bookworm",), "/k.gpg")]


def test_no_source_for_suite_is_an_error(tmp_path: Path) -> None:
    apt = etc_apt(tmp_path, {"sources.list": "deb http://x.example/debian trixie main\n"})
    with pytest.raises(InvalidInput, match="no 'bookworm' source") as e:
        sources.for_suite("bookworm", apt)
    assert "sources.list" in e.value.hint


def test_host_sources_name_no_hardcoded_mirror() -> None:
    # Whatever the host uses is what the build uses: every URI comes from the host's own files.
    text = "".join(p.read_text() for p in Path("/etc/apt").rglob("*")
                   if p.is_file() and p.suffix in (".list", ".sources"))
    for src in sources.for_suite("bookworm"):
        assert src.uri in text


def test_recipe_key_covers_guest_files_and_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    r = recipes.MINIMAL
    k = r.key("Types: deb\n")
    assert k == r.key("Types: deb\n")
    assert k != r.key("Types: deb\nURIs: http://other\n")
    monkeypatch.setattr(guest, "SSHD_CONFIG", guest.SSHD_CONFIG + "# changed\n")
    assert k != r.key("Types: deb\n")


def test_images_with_the_agent_load_its_channel_driver_in_the_initrd() -> None:
    # The agent's virtio-serial port must exist when it starts: its own modprobe during the init is the slow path.
    for r in recipes.RECIPES.values():
        if any(path == guest.AGENT_PATH for path, _ in r.files):
            assert "virtio_console" in r.initrd_modules, r.name
            assert "virtio_console" in r.for_arch("arm64").initrd_modules, r.name


def test_guest_init_is_valid_sh() -> None:
    sh("sh", "-n", Path(guest.__file__).with_name("init.sh"))


def test_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no image recipe named 'huge'"):
        build_image(make_config(tmp_path / "ws", tmp_path / "state"), "huge")


@pytest.mark.root
def test_build_dir_undo_unmounts_before_deleting(tmp_path: Path) -> None:
    # What a SIGKILLed mmdebstrap leaves: its build tree with the host's /dev bind-mounted inside.
    tree = tmp_path / ".build-0badc0de-minimal"
    (tree / "root" / "dev").mkdir(parents=True)
    sh("mount", "--bind", "/dev", tree / "root" / "dev")
    try:
        assert mounts_under(tree)
        undo.lookup("build-dir")({"path": str(tree)})
        assert not tree.exists()
        assert Path("/dev/null").exists()  # the host's /dev was unmounted, not emptied
    finally:
        if mounts_under(tree):
            sh("umount", "-l", tree / "root" / "dev", check=False)
    undo.lookup("build-dir")({"path": str(tree)})  # idempotent


def _leftovers(cache: Path, cfg: Config) -> list[str]:
    out = [p.name for p in (cache / "images").iterdir()] if (cache / "images").exists() else []
    sessions = cfg.state_dir / "sessions"
    out += [p.name for p in sessions.iterdir()] if sessions.exists() else []
    return out


@pytest.mark.root
@pytest.mark.vm
def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_config(tmp_path / "ws", tmp_path / "state")
    broken = recipes.Recipe(**{**recipes.MINIMAL.__dict__, "name": "broken",
                               "packages": ("dispo-no-such-package-anywhere",)})
    with pytest.raises(CommandError, match="mmdebstrap failed"):
        build_product(cfg, broken, quiet=True)
    assert _leftovers(tmp_path / "cache", cfg) == []
    assert not mounts_under(tmp_path)


@pytest.mark.root
def test_unreachable_sources_say_so_not_install_mmdebstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build whose package source is a closed port on loopback: the error names the sources and apt's last
    lines, and does not tell the user to install the mmdebstrap they have."""
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        pytest.skip("needs root and mmdebstrap")
    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/debian"
    monkeypatch.setattr(sources, "for_suite", lambda suite: [sources.AptSource(uri, (suite,), ("main",))])
    monkeypatch.setenv("DISPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_config(tmp_path / "ws", tmp_path / "state")
    with pytest.raises(CommandError) as e:
        build_product(cfg, recipes.MINIMAL, quiet=True)
    line = e.value.one_line()
    assert f"the package sources ({uri}) could not be read: " in line and "apt-get update" in line, line
    assert "install mmdebstrap" not in line and "\n" not in line
    assert _leftovers(tmp_path / "cache", cfg) == []


@pytest.mark.root
@pytest.mark.vm
def test_build_minimal_image(tmp_path: Path) -> None:
    """The real thing, through the CLI: a bootable image carrying its kernel. Uses the shared build cache
    (DISPO_CACHE_DIR or /var/cache/dispo) so the suite builds once."""
    ws, state = tmp_path / "ws", tmp_path / "state"
    env = dict(os.environ, DISPO_WORKSPACE=str(ws), DISPO_STATE_DIR=str(state), DISPO_CONFIG="")
    argv = [sys.executable, "-m", "dispo", "image", "build", "minimal", "--quiet"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr
    image = ImageStore(make_config(ws, state)).get("minimal")
    assert image.kernel_path and image.kernel_path.stat().st_size > 1 << 20
    assert image.initrd_path and image.initrd_path.is_file()
    assert f"init={guest.INIT_PATH}" in image.cmdline and "qemu" in image.vmms
    meta = json.loads((image.path / "image.json").read_text())
    assert meta["kernel_version"].endswith("-cloud-amd64")
    product = cache_dir() / "images" / f"minimal-{meta['build_key']}"
    assert (product / "build.json").is_file()
    # In the root filesystem: the user, its .ssh, the init, no baked-in host key, no kernel.
    def stat(path: str) -> str:
        return sh("debugfs", "-R", f"stat {path}", image.rootfs, check=False).stdout
    assert "User:  1000" in stat(f"{guest.USER_HOME}/.ssh")
    assert "Inode:" in stat(guest.INIT_PATH)
    assert "Inode:" not in stat(guest.HOST_KEY)
    assert "vmlinuz" not in sh("debugfs", "-R", "ls /boot", image.rootfs).stdout
    passwd = sh("debugfs", "-R", "cat /etc/passwd", image.rootfs).stdout
    assert f"{guest.USER}:x:1000:1000" in passwd
    # Building again is an import from the cache, and an existing image needs --force.
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    forced = subprocess.run([*argv, "--force"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert forced.returncode == 0, forced.stderr
    assert not (state / "sessions").exists() or not list((state / "sessions").iterdir())


@pytest.mark.root
def test_parallel_builds_of_one_recipe_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builds of one recipe at once (two sessions, two tests): the second waits on the cache's lock and
    takes the first one's product instead of building into the same place. The build itself is a stand-in
    that writes a product: the lock is the subject, not mmdebstrap."""
    import threading
    import time

    import dispo.imagebuild as ib

    monkeypatch.setenv("DISPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ib, "which", lambda *a, **k: "/bin/true")
    cfg = make_config(tmp_path / "ws", tmp_path / "state")
    builds: list[str] = []

    def fake_build(cfg: Config, recipe: recipes.Recipe, final: Path, **kw: object) -> ib.Product:
        builds.append(final.name)
        time.sleep(0.5)  # the second caller arrives while this one holds the lock
        final.mkdir(parents=True)
        (final / ib.BUILD_META).write_text(json.dumps({"recipe": recipe.name, "key": kw["key"],
                                                       "kernel_version": "6.1", "seconds": 0.5}))
        loaded = ib.Product.load(final)
        assert loaded is not None
        return loaded

    monkeypatch.setattr(ib, "_build", fake_build)
    got: list[ib.Product] = []
    threads = [threading.Thread(target=lambda: got.append(build_product(cfg, recipes.MINIMAL, quiet=True)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(builds) == 1 and len(got) == 2 and got[0].path == got[1].path


def _hostile_rootfs(tmp_path: Path, marker: Path) -> Path:
    """An ext4 root whose apt-get escapes a chroot to the host, as the attack in issue 20 did: the chroot has the
    host's /proc, and /proc/$PPID/root is the host's / for the parent dispo started it from."""
    root = tmp_path / "evil.root"
    for binary in ("/bin/sh", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        (root / binary.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(binary, root / binary.lstrip("/"))
    apt = root / "usr/bin/apt-get"
    apt.parent.mkdir(parents=True)
    apt.write_text(f"#!/bin/sh\necho owned > /proc/$PPID/root{marker}\n")
    apt.chmod(0o755)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True)
    sh("mkfs.ext4", "-q", "-F", "-d", root, tmp_path / "evil.ext4", "32M")
    return tmp_path / "evil.ext4"


@pytest.mark.root
def test_from_refuses_an_imported_image_and_runs_none_of_its_code(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop mount, chroot)")
    monkeypatch.setenv("DISPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_config(tmp_path / "ws", tmp_path / "state")
    marker = tmp_path / "written-by-the-image"
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"a kernel file")
    store = ImageStore(cfg)
    # Imported with everything a bootable image has, and an attempt to claim it was built: the import's own
    # provenance wins over any metadata it is handed.
    store.import_(_hostile_rootfs(tmp_path, marker), "evil", quiet=True, extra_files={"vmlinuz": kernel},
                  extra_meta={"kernel": "vmlinuz", "arch": "x86_64", "vmms": ["qemu"], "provenance": "built"})
    assert store.get("evil").provenance is Provenance.IMPORTED
    with pytest.raises(InvalidInput, match="'evil' was imported, not built or fetched by dispo") as e:
        into.build_from(cfg, "chromium", "evil", quiet=True)
    assert "\n" not in e.value.one_line() and "(hint: " in e.value.one_line()
    assert not marker.exists()  # nothing of the image ran
    assert _leftovers(tmp_path / "cache", cfg) == []
    assert [i.name for i in store.list()] == ["evil"]
    assert not mounts_under(tmp_path)


class _AtTheChroot(Exception):
    pass


@pytest.mark.root
def test_from_accepts_a_dispo_built_image_up_to_running_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop mount, chroot)")
    monkeypatch.setenv("DISPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_config(tmp_path / "ws", tmp_path / "state")
    marker = tmp_path / "written-by-the-image"
    product = tmp_path / "product"
    product.mkdir()
    shutil.copy(_hostile_rootfs(tmp_path, marker), product / "rootfs.ext4")
    for f in (KERNEL, INITRD):
        (product / f).write_bytes(b"from the build")
    import_product(cfg, recipes.MINIMAL, Product(product, "minimal", "0" * 16, "6.1.0", 1.0), "built", quiet=True)
    assert ImageStore(cfg).get("built").provenance is Provenance.BUILT
    ran: list[tuple[str, ...]] = []

    def chroot(tree: Path, *argv: str, timeout: float = 0) -> None:
        ran.append(argv)
        raise _AtTheChroot  # the point where the image's code would run: the real path got this far

    monkeypatch.setattr(into, "_chroot", chroot)
    with pytest.raises(_AtTheChroot):
        into.build_from(cfg, "chromium", "built", quiet=True)
    assert ran == [("apt-get", "update", "-q")]
    assert not marker.exists()
    assert _leftovers(tmp_path / "cache", cfg) == []
    assert not mounts_under(tmp_path)
