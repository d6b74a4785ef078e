"""What several commands share: `-- CMD` parsing, running a host command for a session, tables."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from dispo.errors import InvalidInput


def command(raw: Sequence[str], usage: str) -> list[str]:
    """CMD from argparse.REMAINDER: without the leading '--'; a bare '--' is an error."""
    cmd = list(raw)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if raw and not cmd:
        raise InvalidInput("'--' must be followed by a command", hint=usage)
    return cmd


def run_host_command(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the user's own command on the host, with their terminal and environment plus `env`; its status.

    Not proc.run(): this is the user's program, attached to the user's terminal."""
    try:
        return subprocess.run(list(cmd), env={**os.environ, **env}, check=False).returncode
    except FileNotFoundError:
        raise InvalidInput(f"command not found: {cmd[0]}", hint="give the full path of the command") from None


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
