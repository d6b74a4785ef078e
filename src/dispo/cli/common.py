"""What several commands share: `-- CMD` parsing, running a host command for a session, tables."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dispo.config import Config
from dispo.errors import InvalidInput
from dispo.settings import SETTINGS, describe

if TYPE_CHECKING:
    from dispo.client import DispodClient



class Terminated(Exception):
    """SIGTERM or SIGHUP reached the CLI (raised by its handler in the main thread, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def escape_terminal(text: str) -> str:
    """Guest-controlled text for a terminal: control characters (escape sequences) shown, not obeyed."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c != "\x7f") else f"\\x{ord(c):02x}" for c in text)


def dispod_client(cfg: Config) -> DispodClient | None:
    """A client for dispod when its socket is there and answers, else None (then commands run in-process).
    With --dispod URL (or [client] dispod): that dispod or cluster gateway, on TCP with its token, or an error."""
    from dispo.servicepaths import ServicePaths

    if cfg.client.dispod:
        return remote_client(cfg)

    if not ServicePaths(cfg.state_dir).socket.exists():
        return None
    from dispo.client import DispodClient

    return DispodClient.available(cfg)


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


def setting_flag(key: str) -> str:
    """The option of a session setting: its key without the unit (memory_mib: --memory, ready_timeout_s:
    --ready-timeout), the unit being the metavar's."""
    unit = SETTINGS[key].unit
    stem = key.removesuffix(f"_{unit.lower()}") if unit else key
    return stem.replace("_", "-")


def add_setting_option(p: argparse.ArgumentParser, key: str, default: Any) -> None:
    """The option of the session setting `key`, made from settings.py's table: its type, metavar, choices, and
    a help text with the table's default and limits."""
    s = SETTINGS[key]
    number: dict[str, Any] = {"type": int if s.integer else float,
                              "metavar": {"MiB": "MiB", "s": "S"}.get(s.unit, "N")} if s.number else {}
    p.add_argument(f"--{setting_flag(key)}", choices=s.choices or None, default=default, help=describe(key),
                   **number)


def remote_client(cfg: Config) -> DispodClient:
    """The dispod (or cluster gateway) at [client] dispod, with the token in [client] token_file or
    $DISPO_TOKEN; a ServiceError when it does not answer."""
    from dispo.client import DispodClient
    from dispo.errors import ServiceError

    token = os.environ.get("DISPO_TOKEN", "")
    if not token and cfg.client.token_file is not None:
        try:
            token = cfg.client.token_file.read_text().strip()
        except OSError as e:
            raise InvalidInput(f"cannot read the token file {cfg.client.token_file}: {e.strerror}",
                               hint="[client] token_file names that dispod's dispod.token (root-only)") from None
    if not token:
        raise InvalidInput(f"--dispod {cfg.client.dispod} needs its access token",
                           hint="set $DISPO_TOKEN, or [client] token_file in the config")
    client = DispodClient(base_url=cfg.client.dispod.rstrip("/"), token=token)
    try:
        client.health()
    except ServiceError:
        client.close()
        raise
    return client
