"""Registry of undo actions by resource kind.

A module that creates a host object registers, under a kind name, a function that removes it. The journal
stores (kind, args) *before* the object is created; teardown and `dispo gc` look the kind up here. An undo
function must be idempotent: the object may never have been created (crash between record and create),
or may already be gone (second gc run).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from dispo.errors import JournalError

UndoFn = Callable[[Mapping[str, str]], None]

_UNDOERS: dict[str, UndoFn] = {}

# Modules that register undoers; imported before a journal written by another process is unwound.
PROVIDERS = ("dispo.storage.undoers", "dispo.infra.processes", "dispo.net.undoers", "dispo.imagebuild.undoers",
             "dispo.vmm.firecracker.jailer", "dispo.vmm.sandbox")


def undoer(kind: str) -> Callable[[UndoFn], UndoFn]:
    def register(fn: UndoFn) -> UndoFn:
        if kind in _UNDOERS and _UNDOERS[kind] is not fn:
            raise RuntimeError(f"undo kind {kind!r} registered twice")
        _UNDOERS[kind] = fn
        return fn

    return register


def lookup(kind: str) -> UndoFn:
    if kind not in _UNDOERS:
        for module in PROVIDERS:
            importlib.import_module(module)
    try:
        return _UNDOERS[kind]
    except KeyError:
        raise JournalError(
            f"no undo action known for resource kind {kind!r}",
            hint="this journal was written by another dispo version; remove the object by hand",
        ) from None
