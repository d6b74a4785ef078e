"""Which dispo a build directory in the shared build cache belongs to.

The cache (`DISPO_CACHE_DIR`, default /var/cache/dispo) may be shared by dispo installs with different state
dirs; a build directory names its state dir, so `dispo gc` after a reboot sweeps only its own orphans.
"""

from __future__ import annotations

import time
from pathlib import Path

from dispo.config import Config

OWNER_FILE = ".dispo-state-dir"
UNMARKED_GRACE_S = 3600.0  # a build dir without the mark is only an orphan when older than this


def mark_owner(work: Path, cfg: Config) -> None:
    (work / OWNER_FILE).write_text(str(cfg.state_dir) + "\n")


def owned_by(work: Path, cfg: Config) -> bool:
    """True if `work` was made under cfg's state dir (or carries no mark and is old)."""
    try:
        return (work / OWNER_FILE).read_text().strip() == str(cfg.state_dir)
    except FileNotFoundError:
        try:
            return time.time() - work.stat().st_mtime > UNMARKED_GRACE_S
        except OSError:
            return False
    except OSError:
        return False
