"""`dispo image build RECIPE --from NAME`: install a recipe's app (browser + display stack) into an existing
image, as the seed does by hand inside a VM, and import the result as a new image.

The source image is never changed: its root filesystem is mounted read-only and copied into a build
directory (journaled as "build-dir", whose undoer unmounts whatever is left inside it), apt-get runs in a
chroot there with the host's resolver, then `mkfs.ext4 -d` makes the new root filesystem, which boots with
the source image's kernel, initrd and command line. The source image's own apt sources decide where the
packages come from, so they must offer the recipe's package names (Debian does; Ubuntu ships its browsers
as snaps, which need a running snapd and cannot be installed this way).

The source image's own programs (apt-get, dpkg, maintainer scripts) run as root in that chroot, which is no
boundary for root: they could reach the host (through /proc/PID/root, for one). So `--from` takes only images
dispo itself built or fetched (images.Provenance, recorded and sealed by dispo at build or fetch time); an
imported image is refused before anything exists. (Running the install in a disposable guest instead would
lift that limit.)
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from dispo import guest
from dispo.config import Config
from dispo.errors import InvalidInput, NotFound, PermissionProblem
from dispo.imagebuild import BUILD_TIMEOUT_S, cache_dir, fs_size_mib, recipes, say
from dispo.imagebuild.owner import mark_owner
from dispo.infra.proc import minimal_env, run, which
from dispo.infra.txn import transaction
from dispo.names import check_name, format_size
from dispo.storage import treefs
from dispo.storage.images import Image, ImageStore, Provenance

APT_HINT = "check the source image's apt sources (they must offer the packages) and the host's network"


def _chroot(tree: Path, *argv: str, timeout: float = BUILD_TIMEOUT_S) -> None:
    env = minimal_env({"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"})
    run(["chroot", tree, *argv], env=env, timeout=timeout, hint=APT_HINT)


def build_from(cfg: Config, recipe_name: str, src_name: str, *, name: str | None = None, force: bool = False,
               quiet: bool = False) -> Image:
    store = ImageStore(cfg)
    src = store.get(src_name)
    if not src.provenance.trusted:
        raise InvalidInput(f"image {src.name!r} was imported, not built or fetched by dispo: --from would run its "
                           f"programs (apt-get, dpkg, maintainer scripts) as root on this host",
                           hint="install into an image from 'dispo image build' or 'dispo image fetch', or build "
                                "the recipe on its own: 'dispo image build RECIPE'")
    # The recipe for the source image's architecture (its kernel packages are the source's own).
    recipe = recipes.get(recipe_name, src.arch)
    name = check_name(name or f"{src.name}-{recipe.name}", what="image name")
    if name == src.name:
        raise InvalidInput(f"the new image cannot replace its source {src.name!r}", hint="give --name NEW")
    if src.kernel_path is None or not src.kernel_path.is_file():
        raise InvalidInput(f"image {src.name!r} has no kernel, so the new image could not boot",
                           hint="use an image from 'dispo image build' or 'dispo image fetch'")
    exists = (cfg.images_dir / name / "image.json").exists()
    if exists and not force:
        raise InvalidInput(f"image {name!r} already exists",
                           hint=f"remove it with 'dispo image rm {name}' or add --force to replace it")
    if os.geteuid() != 0:
        raise PermissionProblem("installing into an image needs root (loop mount, chroot)")
    which("chroot", hint="install coreutils")
    from dispo import arch as arches

    arches.ensure_foreign_exec(arches.get(src.arch))  # apt in another architecture's tree: qemu-user
    root = cache_dir() / "images"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionProblem(f"cannot create the build cache {root}: {e.strerror}",
                                hint="set DISPO_CACHE_DIR to a writable directory") from None
    t0 = time.monotonic()
    packages = recipe.app_packages()
    with transaction(cfg, purpose=f"install {recipe.name} into image {src.name}", image=src.name) as tx:
        work = root / f".from-{tx.session_id}-{name}"
        tx.journal.record("build-dir", path=str(work))
        work.mkdir(mode=0o700)
        mark_owner(work, cfg)
        mnt, tree, out = work / "src", work / "root", work / "out"
        for d in (mnt, tree, out):
            d.mkdir()
        say(f"copying image {src.name} ({format_size(src.size)})", quiet)
        run(["mount", "-o", "loop,ro", src.rootfs, mnt], hint="the source image must be an ext4 root filesystem")
        try:
            run(["cp", "-a", f"{mnt}/.", tree], timeout=BUILD_TIMEOUT_S)
        finally:
            run(["umount", mnt], check=False)
        _install(tree, packages, quiet)
        _finish_tree(tree, recipe)
        size_mib = fs_size_mib(tree, recipe.headroom_mib)
        say(f"mkfs.ext4 -d: {size_mib} MiB root filesystem", quiet)
        run(["mkfs.ext4", "-q", "-F", "-L", f"dispo-{name}"[:16], "-d", tree, out / "rootfs.ext4", f"{size_mib}M"],
            hint="install e2fsprogs")
        extra_files = {src.kernel: src.kernel_path}
        meta: dict[str, object] = {"kernel": src.kernel, "cmdline": list(src.cmdline), "arch": src.arch,
                                   "vmms": list(src.vmms), "recipe": recipe.name, "from_image": src.name}
        if src.initrd_path is not None:
            extra_files[src.initrd] = src.initrd_path
            meta["initrd"] = src.initrd
        if src.vmlinux and (src.path / src.vmlinux).is_file():
            extra_files[src.vmlinux] = src.path / src.vmlinux
            meta["vmlinux"] = src.vmlinux
        if exists:
            store.remove(name)
        image = store.import_(out / "rootfs.ext4", name, quiet=quiet, extra_files=extra_files, extra_meta=meta,
                              tx=tx, provenance=Provenance.BUILT)
    say(f"image {image.name}: {recipe.name} installed into {src.name} in {time.monotonic() - t0:.1f} s "
         f"({format_size(image.size)} root filesystem)", quiet)
    return image


def _install(tree: Path, packages: tuple[str, ...], quiet: bool) -> None:
    """apt-get install in a chroot with a fresh proc and sysfs, a minimal /dev of its own (never the host's)
    and the host's resolver; all unmounted after (and by the build-dir undoer if dispo dies meanwhile). The
    source image's code runs as root in that chroot: build_from lets only dispo's own images get here."""
    # The tree is the source image's: every write below goes through treefs (no link is followed).
    saved = treefs.rename(tree, "etc/resolv.conf", ".resolv.conf.dispo-saved")
    treefs.write_file(tree, "etc/resolv.conf", Path("/etc/resolv.conf").read_bytes())
    # No service starts in a chroot (the guest's own init starts what it needs).
    treefs.write_file(tree, "usr/sbin/policy-rc.d", b"#!/bin/sh\nexit 101\n", 0o755)
    # Not the host's /dev: a tmpfs with the few devices apt and dpkg use.
    mounts = [(["-t", "proc", "proc"], "proc"), (["-t", "sysfs", "sysfs"], "sys"),
              (["-t", "tmpfs", "-o", "mode=755,nosuid,noexec,size=1m", "tmpfs"], "dev")]
    done: list[Path] = []
    try:
        for opts, rel in mounts:
            with treefs.open_dir(tree, rel, create=True) as fd:
                # Mounted on the directory the descriptor holds, not on a path mount(8) would resolve.
                run(["mount", *opts, f"/proc/{os.getpid()}/fd/{fd}"])
            done.append(tree / rel)
        _minimal_dev(tree / "dev")
        say(f"apt-get install {' '.join(packages)}", quiet)
        _chroot(tree, "apt-get", "update", "-q")
        _chroot(tree, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages)
        _chroot(tree, "apt-get", "clean")
    finally:
        for target in reversed(done):
            treefs.unmount(target)
        treefs.remove(tree, "etc/resolv.conf")
        treefs.remove(tree, "usr/sbin/policy-rc.d")
        if saved:
            treefs.rename(tree, "etc/.resolv.conf.dispo-saved", "resolv.conf")


_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))


def _minimal_dev(dev: Path) -> None:
    """The devices apt, dpkg and maintainer scripts need, on the chroot's own tmpfs (it was just mounted, so
    nothing in it comes from the image)."""
    for name, major, minor in _DEVICES:
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)  # noqa: S103 - device nodes; apt drops to _apt, which writes /dev/null
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev / name)


def _finish_tree(tree: Path, recipe: recipes.Recipe) -> None:
    """What dispo needs in the guest: the launcher, sshd's settings, the unprivileged user, no host keys."""
    for path, resource in recipe.files:
        treefs.write_file(tree, path, guest.resource(resource), 0o755)
    for path, resource in recipe.configs:
        treefs.write_file(tree, path, guest.resource(resource), 0o644)
    if not treefs.exists(tree, "etc/ssh/sshd_config.d"):
        raise NotFound("the source image has no /etc/ssh/sshd_config.d", hint="use an image with openssh-server")
    treefs.write_file(tree, "etc/ssh/sshd_config.d/dispo.conf", (guest.SSHD_CONFIG + recipe.sshd_extra).encode())
    if run(["chroot", tree, "id", "-u", guest.USER], check=False).returncode != 0:
        run(["useradd", "--root", tree, "--create-home", "--shell", "/bin/bash", "--uid", str(guest.USER_UID),
             "--user-group", guest.USER])
        run(["usermod", "--root", tree, "--password", "*", guest.USER])
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
