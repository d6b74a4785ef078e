"""arm64 end to end: `dispo image build minimal --arch arm64` through qemu-user, then an aarch64 guest on
`qemu-system-aarch64 -M virt` under TCG (this host is x86_64), in the namespaces of tests/netns.py.

The guest says `aarch64`, fetches the page the "internet" namespace serves through the session's NAT, its
command's status is dispo's, it powers off when asked (virt's GPIO power key), and an independent listing
taken after equals the one taken before. The build is cached in DISPO_CACHE_DIR like the amd64 ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest

from tests.guests import listing, qemu_processes
from tests.netns import DISPO, INTERNET, INTERNET_PORT, PAGE, NetWorld, net_world
from tests.tiers import tier

pytestmark = [pytest.mark.root, pytest.mark.vm]

URL = f"http://{INTERNET}:{INTERNET_PORT}/index.txt"
IMAGE = "minimal-arm64"


@pytest.fixture(scope="module")
@tier("browser")
def arm_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    missing = [t for t in ("qemu-system-aarch64", "mmdebstrap", "qemu-aarch64-static") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (qemu-system-arm, mmdebstrap, qemu-user-static)")
    with net_world(tmp_path_factory.mktemp("arm") / "w") as w:
        w.write_config(link="tap", dns="none")
        # Built in the machine's own namespace (apt reaches the mirror there), cached across runs.
        p = subprocess.run([*DISPO, "image", "build", "minimal", "--arch", "arm64", "--quiet"], env=w.env(),
                           capture_output=True, text=True, timeout=2400, check=False, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(f"image {IMAGE}: aarch64,"), p.stdout
        yield w
        for line in qemu_processes(w):  # a failed test must not leave a guest running
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_the_image_records_its_architecture(arm_world: NetWorld) -> None:
    w = arm_world
    ls = w.dispo("image", "ls", timeout=60)
    assert ls.returncode == 0, ls.stderr
    meta = (w.workspace / "images" / IMAGE / "image.json").read_text()
    assert '"arch": "aarch64"' in meta and '"kernel": "Image"' in meta
    # The kernel both VMMs boot: an uncompressed arm64 Image.
    head = (w.workspace / "images" / IMAGE / "Image").read_bytes()[:64]
    assert head[0x38:0x3C] == b"ARM\x64"


def test_arm64_guest_runs_a_command_fetches_a_page_and_leaves_nothing(arm_world: NetWorld) -> None:
    w = arm_world
    before = listing(w)
    script = f"uname -m && curl -sS --max-time 30 {URL}; exit 5"
    p = w.dispo("-v", "run", "--image", IMAGE, "--", "sh", "-c", script, timeout=600)
    assert p.returncode == 5, p.stdout + p.stderr  # the command's status is dispo's
    assert p.stdout == "aarch64\n" + PAGE, p.stdout
    assert "ready in" in p.stderr
    # Ended as on amd64: a disposable guest is killed, not asked to power off (its disk is thrown away); the
    # GPIO power key is for a guest whose kept volume must be flushed (vmm.stop).
    assert "power button" not in p.stderr and "SIGTERM" not in p.stderr, p.stderr
    assert listing(w) == before


def test_an_arm64_image_on_firecracker_here_fails_in_one_line_before_anything_exists(arm_world: NetWorld) -> None:
    w = arm_world
    before = listing(w)
    p = w.dispo("run", "--image", IMAGE, "--backend", "firecracker", "--", "true", timeout=60)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Firecracker runs only guests of the host's architecture" in lines[0], p.stderr
    assert "hint:" in lines[0]
    assert listing(w) == before
