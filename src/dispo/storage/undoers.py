"""Undo actions for the storage objects a journal records."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dispo.infra.undo import undoer
from dispo.storage.backends import remove_tree


@undoer("btrfs-subvolume")
def undo_subvolume(args: Mapping[str, str]) -> None:
    remove_tree(Path(args["path"]))


@undoer("path")
def undo_path(args: Mapping[str, str]) -> None:
    remove_tree(Path(args["path"]))
