"""Undo for an image build directory: unmount what a killed mmdebstrap may have left mounted, then delete.

mmdebstrap in root mode mounts /proc, /sys and /dev into the tree it builds; if it dies by SIGKILL those
mounts stay, and deleting the tree without unmounting first would reach into the host's /dev.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dispo.errors import StorageError
from dispo.infra.proc import run
from dispo.infra.undo import undoer
from dispo.storage.backends import remove_tree


def mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [t for t in targets if t == root or t.startswith(root + "/")]


@undoer("build-dir")
def undo_build_dir(args: Mapping[str, str]) -> None:
    path = Path(args["path"])
    if not os.path.lexists(path):
        return
    for target in sorted(mounts_under(path), key=len, reverse=True):
        run(["umount", "-l", target], check=False)
    left = mounts_under(path)
    if left:
        raise StorageError(f"cannot unmount {left[0]} inside build directory {path}",
                           hint="unmount it by hand, then run 'dispo gc'")
    remove_tree(path)
