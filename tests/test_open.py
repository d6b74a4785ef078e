"""`dispo open URL` as the desktop's handler for links: contrib/dispo-open.desktop installed under a test
XDG_DATA_HOME, made the default for http with xdg-mime, and a link opened with xdg-open (xdg-utils' generic
path, as on a desktop without a DE of its own). The session is real (the minimal image under QEMU); its
"browser" is a profile named chromium, in the test's profiles dir, that prints the URL it was given."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.guests import listing
from tests.netns import INTERNET, INTERNET_PORT, REPO, NetWorld

PROFILE = """image = "minimal"
command = ["sh", "-c", "echo opened-in-dispo \\"$0\\""]
display = "none"
"""


def test_xdg_open_starts_a_disposable_session_on_the_url(vm_world: NetWorld, tmp_path: Path) -> None:
    w = vm_world
    if shutil.which("xdg-open") is None:
        pytest.skip("needs xdg-utils")
    profiles_dir = tmp_path / "profiles"
    profiles_dir.mkdir()
    (profiles_dir / "chromium.toml").write_text(PROFILE)
    w.config.write_text(f'profiles_dir = "{profiles_dir}"\n' + w.config.read_text())
    data, conf, bindir = tmp_path / "data", tmp_path / "config", tmp_path / "bin"
    (data / "applications").mkdir(parents=True)
    conf.mkdir()
    bindir.mkdir()
    shutil.copy(REPO / "contrib" / "dispo-open.desktop", data / "applications")
    # `dispo` on PATH, as an installed dispo would be; here it runs in the test's "host" netns.
    (bindir / "dispo").write_text("#!/bin/sh\nexec " + shlex.join(w.dispo_argv()) + ' "$@"\n')
    (bindir / "dispo").chmod(0o755)
    env = dict(w.env(), XDG_DATA_HOME=str(data), XDG_CONFIG_HOME=str(conf), XDG_DATA_DIRS=str(tmp_path / "none"),
               DISPLAY=":99", PATH=f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin", XDG_CURRENT_DESKTOP="",
               BROWSER="")
    made = subprocess.run(["xdg-mime", "default", "dispo-open.desktop", "x-scheme-handler/http"], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert made.returncode == 0, made.stderr
    query = subprocess.run(["xdg-mime", "query", "default", "x-scheme-handler/http"], env=env,
                           capture_output=True, text=True, timeout=30, check=False)
    assert query.stdout.strip() == "dispo-open.desktop", query
    before = listing(w)
    url = f"http://{INTERNET}:{INTERNET_PORT}/page.html?from=xdg"
    opened = subprocess.run(["xdg-open", url], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert opened.returncode == 0, opened.stderr
    assert f"opened-in-dispo {url}" in opened.stdout, opened.stdout + opened.stderr
    assert "disposal receipt clean" in opened.stderr, opened.stderr
    assert listing(w) == before
