"""The one way dispo runs a subprocess: argv lists only, logged, stdin from /dev/null, minimal env."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from dispo.errors import CommandError, NotFound

log = logging.getLogger(__name__)

# What a child needs and nothing of the caller's secrets; locale fixed so messages parse.
_KEEP_ENV = ("PATH", "HOME", "TERM", "TMPDIR")


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def which(program: str, *, hint: str = "") -> str:
    """Absolute path of `program`, or NotFound saying which package brings it."""
    found = shutil.which(program, path=minimal_env()["PATH"])
    if found is None:
        raise NotFound(f"'{program}' is not installed", hint=hint or f"install the package that provides {program}")
    return found


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: bytes | None = None,  # same name as subprocess.run
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    hint: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion, capturing text output. Raises CommandError on a non-zero exit."""
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input.decode() if input is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=minimal_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise NotFound(f"'{args[0]}' is not installed",
                       hint=hint or f"install the package that provides {args[0]}") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(args, -1, f"timed out after {timeout} s", hint=hint) from e
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stderr or proc.stdout, hint=hint)
    return proc
