"""How the CLI shows a session's output: the guest's bytes pass unchanged into a pipe, and with their control
characters escaped into a terminal (no escape sequence from a guest drives the user's terminal)."""

from __future__ import annotations

import base64
import io
import os
import pty

from dispo.cli.run import Printer
from dispo.runtime import Event, EventKind

HOSTILE = b"\x1b]0;owned title\x07\x1b[2Jclear\r\nok\n"


def _event(data: bytes) -> Event:
    return Event(EventKind.OUTPUT, "0badc0de", "", {"stream": "stdout", "data": base64.b64encode(data).decode()})


def test_output_into_a_pipe_is_unchanged() -> None:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")
    Printer(out=out, err=out)(_event(HOSTILE))
    out.flush()
    assert raw.getvalue() == HOSTILE


def test_output_into_a_terminal_is_escaped() -> None:
    master, slave = pty.openpty()
    try:
        out = open(slave, "w", closefd=False)  # noqa: SIM115 - the pty's writing end, closed below
        Printer(out=out, err=out)(_event(HOSTILE))
        out.close()
        shown = os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;owned title\\x07\\x1b[2Jclear" in shown and "ok" in shown


def test_the_viewer_url_is_printed_once_as_soon_as_known() -> None:
    """`dispo run` prints the viewer's URL when the session starts (its page shows the progress); the `viewer`
    event (the display is up) then says so instead of printing the URL again."""
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out=out, err=err)
    url = "http://127.0.0.1:4242/token/"
    printer.viewer("0badc0de", url)
    assert out.getvalue() == url + "\n"
    printer(Event(EventKind.VIEWER, "0badc0de", f"viewer at {url}", {"url": url}))
    assert out.getvalue() == url + "\n"
    assert err.getvalue().splitlines() == [f"dispo: session 0badc0de: viewer at {url}",
                                           "dispo: session 0badc0de: the display is up"]
