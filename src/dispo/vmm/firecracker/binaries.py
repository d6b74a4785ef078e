"""Where the firecracker and jailer binaries are, and which version each one is.

Lookup order: the config key, then the environment variable, then <workspace>/bin (where
`dispo firecracker install` puts them), then PATH.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path

from dispo.config import Config, JailMode
from dispo.errors import NotFound, VmmError
from dispo.infra.proc import minimal_env, run

INSTALL_HINT = ("install one with 'dispo firecracker install', set firecracker.binary in the config "
                "or $DISPO_FIRECRACKER")
_VERSION_RE = re.compile(r"v(\d+\.\d+\.\d+)")


def install_dir(cfg: Config) -> Path:
    return cfg.workspace / "bin"


def _find(program: str, configured: str, env_var: str, cfg: Config | None, hint: str) -> Path:
    for candidate, origin in ((configured, "config"), (os.environ.get(env_var, ""), f"${env_var}")):
        if candidate:
            path = Path(candidate)
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise NotFound(f"{program} binary {path} (from {origin}) is missing or not executable", hint=hint)
            return path
    if cfg is not None and (install_dir(cfg) / program).is_file():
        return install_dir(cfg) / program
    found = shutil.which(program, path=minimal_env()["PATH"])
    if found is None:
        raise NotFound(f"'{program}' is not installed", hint=hint)
    return Path(found)


def find_firecracker(cfg: Config | None = None) -> Path:
    return _find("firecracker", cfg.firecracker.binary if cfg else "", "DISPO_FIRECRACKER", cfg, INSTALL_HINT)


def find_jailer(cfg: Config | None = None) -> Path:
    return _find("jailer", cfg.firecracker.jailer if cfg else "", "DISPO_JAILER", cfg,
                 "install the jailer from the same release as firecracker, or set $DISPO_JAILER")


@functools.cache
def version_of(binary: Path) -> str:
    """'1.14.1' for a firecracker or jailer binary (from `--version`)."""
    proc = run([binary, "--version"], check=False, timeout=10)
    m = _VERSION_RE.search(proc.stdout + proc.stderr)
    if m is None:
        raise VmmError(f"{binary} --version printed no version", hint=INSTALL_HINT)
    return m.group(1)


def jail_pair(cfg: Config) -> tuple[Path, Path] | None:
    """(jailer, firecracker of the jailer's version) when the config asks for a jail and one is usable.

    `auto` jails only when both exist and match, since a jailer refuses nothing but then runs a binary whose
    seccomp filters and flags it does not know; `on` makes a missing or mismatched pair an error.
    """
    mode = cfg.firecracker.jail
    if mode is JailMode.OFF:
        return None
    try:
        jailer = find_jailer(cfg)
        want = version_of(jailer)
        names = (cfg.firecracker.jailer_firecracker, os.environ.get("DISPO_JAILER_FIRECRACKER", ""))
        candidates = [Path(p) for p in names if p]
        candidates.append(find_firecracker(cfg))
        for cand in candidates:
            if cand.is_file() and version_of(cand) == want:
                return jailer, cand
        raise NotFound(f"no firecracker binary of the jailer's version {want}",
                       hint="set firecracker.jailer_firecracker to the firecracker from the jailer's release")
    except NotFound:
        if mode is JailMode.ON:
            raise
        return None
