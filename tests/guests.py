"""Worlds with real guests (QEMU, TCG here), shared by the vm and browser tiers: the namespaces of
tests/netns.py with a dispo config and images, the listings a test compares before and after, and the helpers
that drive `dispo run` and look at what a guest shows.

conftest.py exposes the fixtures (vm_world, browser_world); test modules import the helpers from here, never
from each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo import profiles
from tests.netns import (
    DISPO,
    INTERNET,
    INTERNET_PORT,
    PYTHON,
    REPO,
    NetWorld,
    dispo_links,
    in_ns,
    net_world,
    nft_ruleset,
)
from tests.tiers import tier
from tests.worlds import loop_fs, sh

# Made once by the first command, like the address pool (a session's own files are inside them). The journals'
# root too: a test's world makes it at its first session (its images come from the run's store, not an import).
POOL_FILES = {"net", "net/leases", "net/lock", "vmm-ids", "sessions"}


def qemu_processes(world: NetWorld) -> list[str]:
    """QEMU processes of this world's sessions: their environment names its state dir (their command line
    holds no path: QEMU gets descriptors)."""
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-system.*dispo-"], capture_output=True, text=True,
                         check=False).stdout
    mine = f"DISPO_STATE_DIR={world.state_dir}".encode()
    found = []
    for line in out.splitlines():
        try:
            if mine in Path(f"/proc/{line.split()[0]}/environ").read_bytes().split(b"\0"):
                found.append(line)
        except OSError:
            continue
    return found


def listing(world: NetWorld) -> dict[str, object]:
    """What a session may leave behind, listed without asking dispo."""
    ws = world.workspace
    state = world.state_dir
    return {
        "links": dispo_links(world.host),
        "nft": nft_ruleset(world.host),
        "disks": sorted(p.name for p in (ws / "sessions").iterdir()) if (ws / "sessions").exists() else [],
        # net/, net/leases/ and net/lock are the address pool's own files, made once; a lease inside is not.
        "state": sorted(str(p.relative_to(state)) for p in state.rglob("*")
                        if str(p.relative_to(state)) not in POOL_FILES) if state.exists() else [],
        "qemu": qemu_processes(world),
    }


class GuestImages:
    """The images a test run boots, each imported once, on one loop-mounted btrfs (per pytest process: an
    xdist worker has its own). A test's workspace lives on the same filesystem and gets the images it asks for
    as read-only snapshots, as an import would leave them: no copy and no hash per test (an import from the
    build cache copies and hashes up to 1.2 GiB), and its sessions' disks are snapshots too (on /tmp's ext4
    each session copied its image). The test's state dir, namespaces and listings stay its own."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.store = mnt / "store"  # the workspace the images are imported into, never one a test runs in
        self.imported: set[str] = set()

    def env(self) -> dict[str, str]:
        return dict(os.environ, DISPO_CONFIG="", DISPO_WORKSPACE=str(self.store),
                    DISPO_STATE_DIR=str(self.mnt / "store-state"))

    @contextlib.contextmanager
    def workspace(self, w: NetWorld) -> Iterator[Path]:
        """A fresh workspace for world `w` on the store's filesystem, removed (its subvolumes too) after."""
        ws = self.mnt / f"ws-{w.suffix}"
        (ws / "images").mkdir(parents=True)
        w.ws = ws
        try:
            yield ws
        finally:
            remove_workspace(ws)

    def give(self, w: NetWorld, recipe: str) -> None:
        """Image `recipe` in w's workspace, as `dispo image build RECIPE` would import it there."""
        if recipe not in self.imported:
            # In the machine's own namespace, where apt reaches the mirror (a test's host namespace has no way
            # out), and cached in DISPO_CACHE_DIR (default /var/cache/dispo): built once per machine.
            p = subprocess.run([*DISPO, "image", "build", recipe, "--quiet"], env=self.env(), capture_output=True,
                               text=True, timeout=1800, check=False, stdin=subprocess.DEVNULL)
            assert p.returncode == 0, p.stderr
            self.imported.add(recipe)
        assert w.ws is not None and w.ws.parent == self.mnt, "give() needs a workspace from workspace()"
        sh("btrfs", "subvolume", "snapshot", "-r", self.store / "images" / recipe, w.ws / "images" / recipe)

    def keep_template(self, w: NetWorld, key: str) -> None:
        """Template `key` (e.g. "profile-chromium"), built in w's workspace, kept in the store for give_template."""
        assert w.ws is not None
        (self.store / "templates").mkdir(exist_ok=True)
        sh("btrfs", "subvolume", "snapshot", "-r", w.ws / "templates" / key, self.store / "templates" / key)

    def give_template(self, w: NetWorld, key: str) -> None:
        """Template `key` in w's workspace, as `dispo template build` left it where it was built: a read-only
        snapshot keeps its files' inodes, sizes and mtimes (what makes a template current), and w has the
        same image (a snapshot of the store's, same sha256 and import time)."""
        assert w.ws is not None and w.ws.parent == self.mnt, "give_template() needs a workspace from workspace()"
        (w.ws / "templates").mkdir(exist_ok=True)
        sh("btrfs", "subvolume", "snapshot", "-r", self.store / "templates" / key, w.ws / "templates" / key)


def remove_workspace(ws: Path) -> None:
    """rm -r for a workspace on btrfs: its images and session disks are subvolumes, removed deepest first."""
    subvolumes = [Path(d) / n for d, names, _ in os.walk(ws) for n in names
                  if not (Path(d) / n).is_symlink() and (Path(d) / n).stat().st_ino == 256]
    for sub in sorted(subvolumes, key=lambda p: len(p.parts), reverse=True):
        sh("btrfs", "property", "set", "-ts", sub, "ro", "false", check=False)
        sh("btrfs", "subvolume", "delete", sub, check=False)
    shutil.rmtree(ws, ignore_errors=True)


@pytest.fixture(scope="session")
@tier("vm")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestImages]:
    if os.geteuid() != 0:
        pytest.skip("needs root: a loop-mounted btrfs")
    # Sparse: it holds what the run's images and sessions write (a few GiB), not its size.
    with loop_fs(tmp_path_factory.mktemp("guest-images"), "btrfs", "40G") as mnt:
        yield GuestImages(mnt)


@contextlib.contextmanager
def guest_world(root: Path, images: GuestImages, *recipes: str) -> Iterator[NetWorld]:
    """The namespaces of tests/netns.py with a tap config and a workspace holding `recipes`' images; a guest
    a failed test left running is killed before the workspace goes."""
    with net_world(root) as w, images.workspace(w):
        w.write_config(link="tap", dns="none")
        for recipe in recipes:
            images.give(w, recipe)
        try:
            yield w
        finally:
            for line in qemu_processes(w):
                os.kill(int(line.split()[0]), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while qemu_processes(w) and time.monotonic() < deadline:
                time.sleep(0.1)


@pytest.fixture
@tier("vm")
def vm_world(tmp_path: Path, guest_images: GuestImages) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("mmdebstrap") is None:
        pytest.skip("needs qemu-system-x86 and mmdebstrap")
    with guest_world(tmp_path / "w", guest_images, "minimal") as w:
        yield w


def wait_ready(w: NetWorld, procs: list[subprocess.Popen[str]], n: int, timeout: float = 240) -> list[str]:
    """Ids of the n sessions whose guest answers SSH (they write ssh.json once ready)."""
    deadline = time.monotonic() + timeout
    while True:
        ready = sorted(p.parent.name for p in (w.state_dir / "sessions").glob("*/ssh.json"))
        if len(ready) == n:
            return ready
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"dispo run exited {p.returncode}: {p.communicate()[1]}")
        assert time.monotonic() < deadline, "sessions not ready in time"
        time.sleep(0.2)


def tcp_banner(w: NetWorld, sid: str, address: str) -> str:
    # bash's /dev/tcp: connects and reads what the other side says first (sshd says "SSH-2.0-...").
    probe = f"exec 3<>/dev/tcp/{address}/22 && head -c 4 <&3"
    p = w.dispo("ssh", sid, "--", "timeout", "5", "bash", "-c", probe, timeout=60)
    return p.stdout


ARTIFACTS = REPO / "artifacts"


RED, GREEN = "ff0000", "00c853"


PAGE_URL = f"http://{INTERNET}:{INTERNET_PORT}/page.html"


COLOUR_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dispo-test-page</title></head>
<body style="margin:0">
<div id="b" style="position:fixed;inset:0;background:#808080;font:64px sans-serif;padding:40px">dispo test page</div>
<script>
if (location.search === "?set") {
  localStorage.setItem("dispo-test", "session one was here");
  document.cookie = "dispotest=1; max-age=86400; path=/";
  location.replace("page.html?check");
} else {
  var seen = localStorage.getItem("dispo-test") !== null || document.cookie.indexOf("dispotest=1") >= 0;
  var b = document.getElementById("b");
  b.style.background = seen ? "#ff0000" : "#00c853";
  b.textContent = seen ? "SEEN: session one's storage is here" : "FRESH: no storage from before";
}
</script></body></html>
"""


# A browser's first page under TCG takes ~30 s after the guest answers SSH; leave room for a busy CI box.
SHOW_TIMEOUT_S = 150


@pytest.fixture
@tier("browser")
def browser_world(tmp_path: Path, guest_images: GuestImages) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "chromium", "convert"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    with guest_world(tmp_path / "w", guest_images, "chromium") as w:
        (w.root / "www-inet" / "page.html").write_text(COLOUR_PAGE)
        yield w


CHROMIUM_TEMPLATE = "profile-chromium"


@pytest.fixture(scope="session")
@tier("browser")
def chromium_template(tmp_path_factory: pytest.TempPathFactory, guest_images: GuestImages) -> str:
    """The chromium profile's template (the browser running on a blank page), built once per test run in a
    world of its own (one boot, then a save); a test hands it to its browser_world with
    `guest_images.give_template(w, chromium_template)` and its `dispo run chromium` sessions are clones
    restored from it. For tests that need a running Chromium but do not test its cold boot."""
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    for tool in ("qemu-system-x86_64", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    with guest_world(tmp_path_factory.mktemp("tpl") / "w", guest_images, "chromium") as w:
        before = listing(w)
        built = w.dispo("template", "build", "chromium", timeout=900)
        assert built.returncode == 0 and f"template {CHROMIUM_TEMPLATE}" in built.stdout, built.stderr
        assert listing(w) == before  # the building session is gone; only the template stays (in the workspace)
        guest_images.keep_template(w, CHROMIUM_TEMPLATE)
    return CHROMIUM_TEMPLATE


def spawn_run(w: NetWorld, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return w.spawn(w.dispo_argv("run", *args), env=env or w.env(), stdout=subprocess.PIPE, stderr=log.open("w"))


def session_id(w: NetWorld, proc: subprocess.Popen[str], log: Path, timeout: float = 240) -> str:
    """The id of the (only) session whose guest answers SSH."""
    deadline = time.monotonic() + timeout
    while True:
        ready = [p.parent.name for p in (w.state_dir / "sessions").glob("*/ssh.json")]
        if ready:
            return ready[0]
        assert proc.poll() is None, f"dispo run exited {proc.returncode}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no session ready: {log.read_text()}"
        time.sleep(0.3)


def viewer_url(proc: subprocess.Popen[str], log: Path, timeout: float = 300) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            line = proc.stdout.readline()
            assert line, f"dispo run ended without a viewer URL: {log.read_text()}"
            if line.startswith("http://127.0.0.1:"):
                return line.strip()
        assert proc.poll() is None, f"dispo run exited {proc.returncode}: {log.read_text()}"
    raise AssertionError(f"no viewer URL after {timeout} s: {log.read_text()}")


def shot(w: NetWorld, url: str, name: str, colour: str, *, end: bool = False, grid: bool = False) -> dict[str, object]:
    ARTIFACTS.mkdir(exist_ok=True)
    argv = [str(PYTHON), "-m", "tests.viewer_shot", url, str(ARTIFACTS / name), colour, str(SHOW_TIMEOUT_S)]
    flags = [*(["--end"] if end else []), *(["--grid"] if grid else [])]
    p = subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", *argv, *flags],
                       capture_output=True, text=True, cwd=REPO, timeout=SHOW_TIMEOUT_S + 60, check=False)
    assert p.returncode == 0, p.stderr
    result: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def wait_listening(ns: str, proto: str, addr: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while f"{addr}:{port}" not in in_ns(ns, "ss", "-H", "-ln", f"-{proto}").stdout:
        assert time.monotonic() < deadline, f"nothing listens on {addr}:{port} ({proto}) in {ns}"
        time.sleep(0.05)


DISPOD_FILES = {"dispod.sock", "dispod.url", "dispod.token", "dispod.lock"}


def state_listing(w: NetWorld) -> dict[str, object]:
    """listing() without dispod's own files (they live as long as dispod, not as a session)."""
    found = listing(w)
    state = found["state"]
    assert isinstance(state, list)
    found["state"] = [p for p in state if p not in DISPOD_FILES]
    return found


def chromium_profile(w: NetWorld, name: str, secure_origin: str, *, sound: bool = False) -> None:
    """The built-in chromium profile under `name` in the world's profiles_dir, the test's plain-HTTP server
    (`secure_origin`, "http://HOST:PORT") counting as a secure origin: Chromium holds back a plain-HTTP download
    until a person keeps it (an "insecure download"), as a real site's HTTPS would not. Sound on if asked (the
    built-in profile has it off)."""
    text = (profiles.BUILTIN_DIR / "chromium.toml").read_text()
    if sound:
        text = text.replace("audio = false", "audio = true")
    text = text.replace('"--test-type"', f'"--test-type", "--unsafely-treat-insecure-origin-as-secure={secure_origin}"')
    assert "unsafely" in text and (not sound or "audio = true" in text)
    d = w.root / "profiles"
    d.mkdir(exist_ok=True)
    (d / f"{name}.toml").write_text(text)
    config = w.config.read_text()
    if f'profiles_dir = "{d}"' not in config:
        w.config.write_text(f'profiles_dir = "{d}"\n' + config)
