from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.config import Config, StorageBackend
from tests.guests import browser_world, chromium_template, guest_images, vm_world
from tests.tiers import marker, tier, tier_of
from tests.worlds import loop_fs, make_config, make_ext4

# The worlds with real guests, for every module (tests/guests.py); pytest finds fixtures by name.
__all__ = ["browser_world", "chromium_template", "guest_images", "vm_world"]

IS_ROOT = os.geteuid() == 0

# dispo commands the tests run on a scratch workspace in /tmp (ext4) make no storage pool (a loop mount there):
# tests/test_pool.py asks for one where it tests it.
os.environ.setdefault("DISPO_STORAGE_POOL", "none")

# The largest VM test holds about 3 GiB in its tmp_path at once; with less free than this the suite would fail
# as a hundred "not enough space" errors, so it stops before the first test and says why.
MIN_FREE_GIB = 10


def pytest_sessionstart(session: pytest.Session) -> None:
    given = session.config.option.basetemp
    where = Path(given).parent if given else Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir())
    free = shutil.disk_usage(where).free / 2**30
    if free < MIN_FREE_GIB:
        pytest.exit(f"only {free:.1f} GiB free in {where}; the suite needs {MIN_FREE_GIB} GiB "
                    "(hint: remove old /tmp/pytest-of-* runs, or point TMPDIR or --basetemp at a larger filesystem)",
                    returncode=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets exactly one tier marker (tests/tiers.py), so `-m tier_fast` and friends select a tier; a test
    above the fast tier skips without root, saying why."""
    skip_root = pytest.mark.skip(reason="needs root (loop devices, btrfs, namespaces): run the suite with sudo")
    for item in items:
        name = tier_of(item)
        item.add_marker(getattr(pytest.mark, marker(name)))
        if name != "fast" and not IS_ROOT:
            item.add_marker(skip_root)


@pytest.fixture
@tier("root")
def btrfs_mnt(tmp_path: Path) -> Iterator[Path]:
    with loop_fs(tmp_path / "btrfs", "btrfs", "2G") as mnt:
        yield mnt


@pytest.fixture
@tier("root")
def xfs_mnt(tmp_path: Path) -> Iterator[Path]:
    with loop_fs(tmp_path / "xfs", "xfs", "1G") as mnt:
        yield mnt


@pytest.fixture
@tier("root")
def ext4_mnt(tmp_path: Path) -> Iterator[Path]:
    with loop_fs(tmp_path / "ext4", "ext4", "512M") as mnt:
        yield mnt


@pytest.fixture
def src_image(tmp_path: Path) -> Path:
    return make_ext4(tmp_path / "src.ext4", "32M", {"etc/hostname": "known-good\n", "data/a.txt": "a" * 5000})


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(params=["btrfs", "reflink", "copy"])
@tier("root")
def cfg(request: pytest.FixtureRequest, tmp_path: Path, state_dir: Path) -> Iterator[Config]:
    """A dispo config for each storage backend on a real filesystem: btrfs snapshots and reflinks on a
    loop-mounted btrfs, plain copies on a loop-mounted ext4."""
    if not IS_ROOT:
        pytest.skip("needs root to loop-mount a filesystem: run the suite with sudo")
    kind = StorageBackend(request.param)
    fstype = "ext4" if kind is StorageBackend.COPY else "btrfs"
    with loop_fs(tmp_path / fstype, fstype, "2G" if fstype == "btrfs" else "512M") as mnt:
        yield make_config(mnt / "dispo", state_dir, kind)


@pytest.fixture
@tier("root")
def chroot_base() -> Iterator[Path]:
    # Short, so the API socket path inside the jail fits a unix socket address; on / (not nodev).
    base = Path(tempfile.mkdtemp(prefix="dj-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
