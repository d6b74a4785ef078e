"""`dispo image build RECIPE`: a small bootable Debian image from Debian's packages, with mmdebstrap.

Build products (rootfs.ext4, vmlinuz, initrd.img, build.json) are cached outside the repository in
$DISPO_CACHE_DIR (default /var/cache/dispo) under images/<recipe>-<key>/, where the key covers the recipe,
the guest files and the apt sources, so CI builds once and every later build is an import. A build runs in
images/.build-<session id>-<recipe>/, journaled before it exists and renamed into place only when complete
(build.json written last), so a failed or killed build leaves nothing that looks like a product.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dispo import arch as arches
from dispo import guest, kernels
from dispo.config import Config
from dispo.errors import CommandError, InvalidInput, NotFound, PermissionProblem, StorageError
from dispo.imagebuild import recipes, sources
from dispo.imagebuild.owner import mark_owner
from dispo.imagebuild.recipes import Recipe
from dispo.infra import progress
from dispo.infra.proc import run, which
from dispo.infra.txn import transaction
from dispo.names import check_name, format_size
from dispo.storage.images import Image, ImageStore, Provenance

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/dispo")
MMDEBSTRAP_HINT = "install mmdebstrap (apt-get install mmdebstrap)"
BUILD_TIMEOUT_S = 1800.0
KERNEL, INITRD, BUILD_META = "vmlinuz", "initrd.img", "build.json"
VMLINUX = "vmlinux"  # the ELF kernel Firecracker boots (recipes with vmlinux=True)
ARM64_IMAGE = "Image"  # arm64: the uncompressed Image both QEMU (-M virt) and Firecracker on aarch64 boot


def cache_dir() -> Path:
    return Path(os.environ.get("DISPO_CACHE_DIR") or DEFAULT_CACHE_DIR)


@dataclass(frozen=True)
class Product:
    """A finished build in the cache."""

    path: Path
    recipe: str
    key: str
    kernel_version: str
    seconds: float

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.ext4"

    @classmethod
    def load(cls, path: Path) -> Product | None:
        try:
            m = json.loads((path / BUILD_META).read_text())
            return cls(path, str(m["recipe"]), str(m["key"]), str(m["kernel_version"]), float(m["seconds"]))
        except (OSError, ValueError, KeyError):
            return None


def say(msg: str, quiet: bool) -> None:
    """A step of a long build, for the person waiting: the CLI shows the progress log (progress.LOG)."""
    if not quiet:
        progress.LOG.info(msg)


def product_path(recipe: Recipe) -> Path:
    """Where the build of `recipe` for the host's current apt sources is (or would be) cached."""
    return cache_dir() / "images" / f"{recipe.stem}-{recipe.key(sources.deb822_text(sources.for_suite(recipe.suite)))}"


@contextlib.contextmanager
def _build_lock(root: Path, stem: str, quiet: bool) -> Iterator[None]:
    """One build of a recipe's architecture at a time in this cache: a second `dispo image build` (another
    session, a parallel test) waits for the first and then finds its product instead of building it again
    into the same place."""
    locks = root.parent / "locks"  # beside the products, not among them: a lock file stays, like apt's
    locks.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(locks / f"build-{stem}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build of {stem} in {root}", quiet)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_product(cfg: Config, recipe: Recipe, *, rebuild: bool = False, quiet: bool = False) -> Product:
    """The cached build of `recipe` for the host's current apt sources, building it if needed."""
    apt_sources = sources.deb822_text(sources.for_suite(recipe.suite))
    key = recipe.key(apt_sources)
    root = cache_dir() / "images"
    final = root / f"{recipe.stem}-{key}"
    if not rebuild and (done := Product.load(final)) is not None:
        say(f"using cached build {final}", quiet)
        return done
    if os.geteuid() != 0:
        raise PermissionProblem("building an image needs root (mmdebstrap --mode=root, chroot, device nodes)")
    which("mmdebstrap", hint=MMDEBSTRAP_HINT)
    # Another architecture's maintainer scripts run through qemu-user (binfmt_misc): there or a clear error.
    if did := arches.ensure_foreign_exec(arches.get(recipe.arch)):
        say(f"{recipe.arch} build on this {arches.host().debian} host: {did}", quiet)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionProblem(f"cannot create the build cache {root}: {e.strerror}",
                                hint="set DISPO_CACHE_DIR to a writable directory") from None
    with _build_lock(root, recipe.stem, quiet):
        if not rebuild and (done := Product.load(final)) is not None:  # built by the one we waited for
            say(f"using cached build {final}", quiet)
            return done
        return _build(cfg, recipe, final, key=key, apt_sources=apt_sources, quiet=quiet)


def _build(cfg: Config, recipe: Recipe, final: Path, *, key: str, apt_sources: str, quiet: bool) -> Product:
    root = final.parent
    t0 = time.monotonic()
    with transaction(cfg, purpose=f"build image {recipe.name}", image=recipe.name) as tx:
        work = root / f".build-{tx.session_id}-{recipe.name}"
        tx.journal.record("build-dir", path=str(work))
        work.mkdir(mode=0o700)
        mark_owner(work, cfg)
        (work / "apt.sources").write_text(apt_sources)
        _write_overlay(work / "overlay", recipe)
        tree = work / "root"
        say(f"mmdebstrap {recipe.suite} ({', '.join(recipe.packages)})", quiet)
        _mmdebstrap(["mmdebstrap", "--mode=root", "--format=directory", "--variant=minbase",
             f"--architectures={recipe.arch}", f"--include={','.join(recipe.packages)}",
             # Documentation and translations are dead weight in a disposable guest.
             "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
             "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
             "--dpkgopt=path-exclude=/usr/share/info/*",
             # Before the kernel package runs update-initramfs, so the one initrd it makes is the right one.
             f"--essential-hook=sync-in {work / 'overlay'} /",
             "--quiet" if quiet else "--verbose",
             recipe.suite, tree, work / "apt.sources"], apt_sources)
        out = work / "out"
        out.mkdir()
        kernel_version = _customize(tree, out)
        _prune_modules(tree, kernel_version, recipe.prune_modules)
        if recipe.vmlinux:
            kernels.extract_vmlinux(out / KERNEL, out / VMLINUX)
        if recipe.arch == arches.ARM64.debian:
            kernels.arm64_image(out / KERNEL, out / ARM64_IMAGE)
        size_mib = fs_size_mib(tree, recipe.headroom_mib)
        say(f"mkfs.ext4 -d: {size_mib} MiB root filesystem", quiet)
        run(["mkfs.ext4", "-q", "-F", "-L", f"dispo-{recipe.name}", "-d", tree, out / "rootfs.ext4", f"{size_mib}M"],
            hint="install e2fsprogs")
        seconds = time.monotonic() - t0
        (out / BUILD_META).write_text(json.dumps({"recipe": recipe.name, "arch": recipe.arch, "key": key,
                                                 "kernel_version": kernel_version,
                                                 "seconds": round(seconds, 1), "built": time.time()}) + "\n")
        if os.path.lexists(final):  # a stale product under the same key: delete before create
            shutil.rmtree(final)
        os.rename(out, final)
    for old in older_builds(root, recipe.stem, final):
        shutil.rmtree(old, ignore_errors=True)
    product = Product.load(final)
    if product is None:
        raise StorageError(f"build product {final} is incomplete")
    say(f"built {recipe.name} in {seconds:.1f} s (kernel {kernel_version})", quiet)
    return product


def _mmdebstrap(argv: list[str | Path], apt_sources: str) -> None:
    """Run mmdebstrap; a failure says what failed (MMDEBSTRAP_HINT only when it is not installed)."""
    try:
        run(argv, timeout=BUILD_TIMEOUT_S, hint=MMDEBSTRAP_HINT)
    except CommandError as e:
        raise mmdebstrap_failure(e, apt_sources) from None


# apt's words for a source it could not read: no connection, no name, no route, no Release file, a bad signature.
_UNREACHABLE = re.compile(r"apt-get update .*failed|Failed to fetch|Could not connect|Could not resolve|"
                          r"Temporary failure resolving|Connection refused|Network is unreachable|No route to host|"
                          r"does not have a Release file|is not signed|NO_PUBKEY")
_NOISE = ("E: mmdebstrap failed to run", "I: main() received signal")
LAST_LINES, LAST_CHARS = 3, 600


def mmdebstrap_failure(e: CommandError, apt_sources: str) -> CommandError:
    """A failed mmdebstrap as one line: what failed (the package sources, when apt could not read them) and its
    last error lines. Its whole output stays in the error's `stderr`."""
    if e.returncode == -1:  # proc.run's timeout
        return CommandError(e.argv, e.returncode, e.stderr,
                            hint="the package sources may be slow or unreachable: check them with 'apt-get update'")
    lines = [ln.strip() for ln in e.stderr.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    errors = [ln for ln in lines if ln.startswith(("E:", "W:", "Err:"))] or lines
    last = " | ".join(errors[-LAST_LINES:])[-LAST_CHARS:] or "no output"
    if _UNREACHABLE.search(e.stderr):
        uris = ", ".join(dict.fromkeys(s.uri for s in sources.parse_deb822(apt_sources))) or "none"
        return CommandError(e.argv, e.returncode, f"{e.stderr}\nthe package sources ({uris}) could not be read: {last}",
                            hint="check that this host reaches them (network, proxy, DNS; 'apt-get update' shows "
                                 "it): builds use the host's apt sources")
    return CommandError(e.argv, e.returncode, f"{e.stderr}\n{last}",
                        hint="its last lines say why; -vv shows all of its output")


def older_builds(root: Path, stem: str, final: Path) -> list[Path]:
    """Earlier builds of this recipe for this architecture only (minimal-<key>, never minimal-arm64-<key>)."""
    same = re.compile(rf"{re.escape(stem)}-[0-9a-f]{{16}}")
    return sorted(p for p in root.glob(f"{stem}-*") if p != final and same.fullmatch(p.name))


def _write_overlay(overlay: Path, recipe: Recipe) -> None:
    """Files that must be in the tree before the packages are installed."""
    files = {
        "etc/initramfs-tools/modules": ("".join(f"{m}\n" for m in recipe.initrd_modules), 0o644),
        # Only the listed modules: the build host's hardware says nothing about the guest's.
        "etc/initramfs-tools/conf.d/dispo.conf": ("MODULES=list\n", 0o644),
        "etc/ssh/sshd_config.d/dispo.conf": (guest.SSHD_CONFIG + recipe.sshd_extra, 0o644),
    }
    for path, resource in recipe.files:
        files[path.lstrip("/")] = (guest.resource(resource).decode(), 0o755)
    for path, resource in recipe.configs:
        files[path.lstrip("/")] = (guest.resource(resource).decode(), 0o644)
    for rel, (text, mode) in files.items():
        p = overlay / rel
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        p.write_text(text)
        p.chmod(mode)
    init = overlay / guest.INIT_PATH.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    init.write_bytes(guest.init_script())
    init.chmod(0o755)
    for d in [overlay, *(p for p in overlay.rglob("*") if p.is_dir())]:
        d.chmod(0o755)


def _customize(tree: Path, out: Path) -> str:
    """The unprivileged user, no baked-in host keys, kernel and initrd moved out of the tree."""
    run(["useradd", "--root", tree, "--create-home", "--shell", "/bin/bash", "--uid", str(guest.USER_UID),
         "--user-group", guest.USER])
    # '*' rather than the locked '!': sshd without PAM refuses key logins to locked accounts.
    run(["usermod", "--root", tree, "--password", "*", guest.USER])
    ssh_dir = tree / guest.USER_HOME.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    os.chown(ssh_dir, guest.USER_UID, guest.USER_UID)
    # Every session gets its own host key (dispo.ssh); one baked into the image would be shared by all.
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise StorageError(f"expected one kernel in the built tree, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = tree / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise StorageError(f"the built tree has no initrd for kernel {version}")
    shutil.copyfile(kernels[0], out / KERNEL)
    shutil.copyfile(initrd, out / INITRD)
    for f in (tree / "boot").iterdir():  # the VMM loads the kernel from the image, not from the disk
        f.unlink()
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        (tree / link).unlink(missing_ok=True)
    return version


def _prune_modules(tree: Path, version: str, prune: tuple[str, ...]) -> None:
    """Delete the module directories `prune` names and index what is left, with the tree's own depmod (kmod is
    in every recipe; another architecture's runs through qemu-user)."""
    if not prune:
        return
    base = tree / "usr/lib/modules" / version
    for rel in prune:
        target = base / rel
        if ".." in Path(rel).parts or not target.resolve().is_relative_to(base.resolve()):
            raise StorageError(f"refusing to prune {rel!r} outside {base}")
        shutil.rmtree(target, ignore_errors=True)
    run(["chroot", tree, "/sbin/depmod", version], hint="the recipe must install kmod")


def fs_size_mib(tree: Path, headroom_mib: int) -> int:
    used = int(run(["du", "-s", "--block-size=1M", "-x", tree]).stdout.split()[0])
    # ext4 metadata and the journal need ~15 %; round to 64 MiB so sizes stay readable.
    size = int(used * 1.15) + headroom_mib
    return (size + 63) // 64 * 64


def default_arch() -> str:
    """The Debian architecture a build is for unless --arch says: the host's."""
    return arches.host().debian


def build_image(cfg: Config, recipe_name: str, *, name: str | None = None, rebuild: bool = False,
                force: bool = False, quiet: bool = False, arch: str | None = None) -> Image:
    """Build (or take from the cache) recipe `recipe_name` for `arch` (default: the host's) and import it as
    image `name` (default: the recipe's name on the host's architecture, RECIPE-ARCH for another one)."""
    recipe = recipes.get(recipe_name, arch or default_arch())
    default = recipe.name if recipe.arch == default_arch() else f"{recipe.name}-{recipe.arch}"
    name = check_name(name or default, what="image name")
    if (cfg.images_dir / name / "image.json").exists() and not force:
        raise InvalidInput(f"image {name!r} already exists",
                           hint=f"remove it with 'dispo image rm {name}' or add --force to replace it")
    product = build_product(cfg, recipe, rebuild=rebuild, quiet=quiet)
    return import_product(cfg, recipe, product, name, force=force, quiet=quiet)


def import_product(cfg: Config, recipe: Recipe, product: Product, name: str, *, force: bool = False,
                   quiet: bool = False) -> Image:
    """Import a finished build of `recipe` as image `name` (its kernel, initrd, arguments and architecture)."""
    store = ImageStore(cfg)
    exists = (cfg.images_dir / name / "image.json").exists()
    if exists and not force:
        raise InvalidInput(f"image {name!r} already exists",
                           hint=f"remove it with 'dispo image rm {name}' or add --force to replace it")
    a = arches.get(recipe.arch)
    kernel = ARM64_IMAGE if a is arches.ARM64 else KERNEL
    extra_files = {kernel: product.path / kernel, INITRD: product.path / INITRD}
    extra_meta: dict[str, object] = {
        "kernel": kernel, "initrd": INITRD, "cmdline": list(recipe.cmdline), "arch": a.machine,
        "vmms": list(recipe.vmms), "recipe": recipe.name, "build_key": product.key,
        "kernel_version": product.kernel_version}
    if recipe.vmlinux:
        extra_files[VMLINUX] = product.path / VMLINUX
        extra_meta["vmlinux"] = VMLINUX
    for f in (product.rootfs, *extra_files.values()):
        if not f.is_file():
            raise NotFound(f"build product file {f} is missing", hint="rebuild with --rebuild")
    if exists:
        store.remove(name)
    image = store.import_(product.rootfs, name, quiet=quiet, extra_files=extra_files, extra_meta=extra_meta,
                          provenance=Provenance.BUILT)
    say(f"image {image.name}: {format_size(image.size)} root filesystem, kernel {product.kernel_version}", quiet)
    return image
