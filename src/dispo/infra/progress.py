"""Progress for long work, on stderr: a live line on a terminal, a line per 10 % otherwise; and `LOG`, where
library code says which step of a long job it is on (the CLI shows it as "dispo: ..." lines)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from dispo.names import format_size

# Work this small is over before a log line would help; only a terminal shows it.
_QUIET_BELOW = 256 << 20

LOG = logging.getLogger("dispo.infra.progress")


def show_on(stream: TextIO) -> None:
    """Show LOG's steps on `stream` as "dispo: ..." lines (the CLI's choice, not the library's)."""
    LOG.handlers.clear()  # main() may run more than once in a process (tests): one handler, one line each
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("dispo: %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self._start = time.monotonic()
        self._last_decile = -1
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total <= 0 or (not self.tty and total < _QUIET_BELOW):
            return
        pct = min(100, done * 100 // total)
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw < 0.1 and done < total:
                return
            self._last_draw = now
            rate = done / max(now - self._start, 1e-6)
            self.stream.write(f"\r{self.label}: {pct:3d}% {format_size(done)} / {format_size(total)} "
                              f"({format_size(rate)}/s)\x1b[K")
            if done >= total:
                self.stream.write("\n")
        elif pct // 10 != self._last_decile:
            self._last_decile = pct // 10
            self.stream.write(f"{self.label}: {pct}%\n")
        self.stream.flush()
