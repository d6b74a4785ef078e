"""`dispo run --backend firecracker` through the real binary, as far as this host allows.

A Linux guest does not boot under this machine's KVM, so the guest here is the tiny hand-made ELF (it writes
a line to COM1 and waits): the whole session path is real — disk clone, tap and nftables rules, the
firecracker process on that tap, InstanceStart, the console log — up to SSH readiness, which never comes.
The test asserts the one-line error, the console tail, and that nothing is left behind.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo import config
from dispo.storage.images import ImageStore
from dispo.vmm.firecracker.probe import GUEST_LINE, tiny_elf
from tests.fcworld import firecracker_or_skip_reason, processes_mentioning
from tests.guests import listing
from tests.netns import NetWorld, net_world
from tests.tiers import tier
from tests.worlds import make_ext4

pytestmark = [pytest.mark.root]

FC, WHY = firecracker_or_skip_reason()


@pytest.fixture
@tier("vm")
def fc_world(tmp_path: Path) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    if FC is None:
        pytest.skip(WHY)
    with net_world(tmp_path / "w", servers=False) as w:
        w.write_config(link="tap", dns="none")
        cfg = config.load(w.config, env=w.env())
        kernel = tiny_elf(tmp_path / "vmlinux")
        # Just enough of a root filesystem for dispo to write the session's SSH keys into.
        root = make_ext4(tmp_path / "root.ext4", "32M", {"home/user/.ssh/.keep": "", "etc/ssh/.keep": ""})
        ImageStore(cfg).import_(root, "fcprobe", quiet=True,
                                extra_files={"vmlinux": kernel},
                                extra_meta={"kernel": "vmlinux", "vmms": ["firecracker"],
                                            "cmdline": ["console=ttyS0"]})
        yield w


def test_firecracker_session_path_and_clean_failure(fc_world: NetWorld) -> None:
    w = fc_world
    before = listing(w)
    p = _dispo_env(w, {"DISPO_FIRECRACKER": str(FC)}, "run", "--image", "fcprobe", "--backend", "firecracker",
                   "--ready-timeout", "3", "--", "true")
    assert p.returncode == 1, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("dispo: error: ")]
    assert len(errors) == 1, p.stderr
    assert "firecracker" in errors[0] or "SSH" in errors[0] or "ready" in errors[0], errors[0]
    # The guest really ran on the session's VMM: its serial line is in the console tail dispo shows.
    assert GUEST_LINE.decode().strip() in p.stderr, p.stderr
    assert listing(w) == before
    assert processes_mentioning(str(w.state_dir)) == []


def test_image_not_for_firecracker_is_refused(fc_world: NetWorld, tmp_path: Path) -> None:
    cfg = config.load(fc_world.config, env=fc_world.env())
    ImageStore(cfg).import_(make_ext4(tmp_path / "q.ext4"), "qonly", quiet=True,
                            extra_files={"vmlinuz": tmp_path / "vmlinux"},
                            extra_meta={"kernel": "vmlinuz", "vmms": ["qemu"]})
    before = listing(fc_world)
    p = _dispo_env(fc_world, {}, "run", "--image", "qonly", "--backend", "firecracker", "--", "true")
    assert p.returncode == 1
    assert "is not built for firecracker" in p.stderr and "(hint: " in p.stderr
    assert listing(fc_world) == before


def _dispo_env(w: NetWorld, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(w.dispo_argv(*args), capture_output=True, text=True, env={**w.env(), **extra},
                          stdin=subprocess.DEVNULL, timeout=90, check=False)
