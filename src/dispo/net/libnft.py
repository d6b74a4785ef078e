"""nftables scripts applied in-process through libnftables (the library the `nft` command is a front end of),
each as one nf_tables netlink batch: all of a session's chains, rules and map elements commit together or
not at all, exactly as `nft -f` would, with the same parser and so the same rules.

Why in-process: starting `nft` costs a process (exec, dynamic linking of half a dozen libraries) per change,
several milliseconds on a loaded host, twice per session (up and down). The library comes with the `nft`
command dispo already needs (Debian's nftables package depends on libnftables1); when it cannot be loaded the
script goes to `nft -f -` as before. A fresh context per call: a context caches the ruleset, and several
dispo processes and threads change it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Sequence

from dispo.errors import CommandError, NetworkError
from dispo.infra.closer import close_behind
from dispo.infra.proc import run

NFT_HINT = "install nftables (apt install nftables) and run dispo as root"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            name = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                return None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _lib = lib
        return _lib


def apply(script: Sequence[str]) -> None:
    """Apply a list of nft commands as one atomic transaction. Raises NetworkError with nft's message."""
    text = "\n".join(script) + "\n"
    lib = _load()
    if lib is None:
        try:
            run(["nft", "-f", "-"], input=text.encode(), hint=NFT_HINT)
        except CommandError as e:
            raise NetworkError(f"nftables refused dispo's rules: {e.message}", hint=NFT_HINT) from None
        return
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NetworkError("cannot start libnftables (out of memory?)", hint=NFT_HINT)
    try:
        # Both buffered: the library must not write to dispo's own stdout or stderr.
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if lib.nft_run_cmd_from_buffer(ctx, text.encode()) != 0:
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
            lines = [line for line in error.splitlines() if line.strip()]
            raise NetworkError(f"nftables refused dispo's rules: {lines[0] if lines else 'no reason given'}",
                               hint=NFT_HINT)
    finally:
        # Freeing the context closes its netlink socket, which waits for the kernel to free what earlier
        # transactions deleted (see infra/closer.py): done in a thread of its own.
        close_behind(lambda: lib.nft_ctx_free(ctx))
