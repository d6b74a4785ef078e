"""`dispo run PROFILE --open`: the viewer's token never reaches a command line, and the desktop's browser runs as
the user who invoked dispo (under sudo: $SUDO_UID), on a 0600 redirect file of theirs that goes with the session.

The "browser" is a stand-in named by $BROWSER that records its argv and uid; the invoking user is `nobody`."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo import config as config_mod
from dispo.cli.run import Printer
from dispo.cli.viewerlink import ViewerLink
from dispo.config import Config
from dispo.infra import journal
from dispo.runtime import Event, EventKind

pytestmark = pytest.mark.root

NOBODY = 65534
TOKEN = "s3cr3t-t0ken-0123456789abcdef"  # noqa: S105 - a stand-in viewer token
URL = f"http://127.0.0.1:8123/viewer/0badc0de/{TOKEN}/"

STANDIN = f"""#!{sys.executable}
import json, os, sys
json.dump({{"argv": sys.argv, "uid": os.getuid(), "gid": os.getgid(), "page": open(sys.argv[1]).read(),
           "opening": os.environ.get("DISPO_OPENING")}}, open(os.environ["RECORD"], "w"))
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Config, Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the opener drops to the invoking user")
    state = tmp_path / "state"
    path = tmp_path / "dispo.toml"
    path.write_text(f'workspace = "{tmp_path / "ws"}"\nstate_dir = "{state}"\n')
    shared = Path(tempfile.mkdtemp(prefix="dispo-test-browser-"))  # nobody must run and write here
    try:
        shared.chmod(0o777)
        browser = shared / "browser"
        browser.write_text(STANDIN)
        browser.chmod(0o755)
        yield config_mod.load(path, env={}), browser, shared / "record.json"
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_open_passes_a_private_file_not_the_token_and_runs_as_the_sudo_user(
        world: tuple[Config, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, browser, record = world
    monkeypatch.setenv("SUDO_UID", str(NOBODY))
    monkeypatch.setenv("SUDO_GID", str(NOBODY))
    monkeypatch.setenv("BROWSER", str(browser))
    monkeypatch.setenv("RECORD", str(record))
    err = io.StringIO()
    with ViewerLink(cfg) as link:  # as cmd_run holds it: for the session's whole life
        Printer(link=link, out=io.StringIO(), err=err)(Event(EventKind.VIEWER, "0badc0de", "", {"url": URL}))
        deadline = time.monotonic() + 10
        while not record.exists():
            assert time.monotonic() < deadline, f"the opener never ran: {err.getvalue()}"
            time.sleep(0.05)
        time.sleep(0.1)  # the record is written in one go, but let the stand-in close it
        seen = json.loads(record.read_text())
        page = link.path
        assert page is not None
        st, dst = page.stat(), page.parent.stat()
        journaled = [e.args.get("path") for info in journal.scan(cfg.state_dir) for e in info.resources]
    assert TOKEN not in " ".join(seen["argv"]) and seen["argv"][1:] == [str(page)]
    assert (seen["uid"], seen["gid"]) == (NOBODY, NOBODY)
    assert seen["opening"] == "1"  # a `dispo open` started by it sees the loop
    assert URL in seen["page"] and 'http-equiv="refresh"' in seen["page"]
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == NOBODY
    assert journaled == [str(page.parent)]  # recorded, so `dispo gc` removes it after a crash
    # The session (and the command) ended: the file, its directory and the journal are gone.
    assert not page.parent.exists()
    assert list(journal.scan(cfg.state_dir)) == []
