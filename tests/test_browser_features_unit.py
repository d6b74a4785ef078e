"""The browser features' logic, fast: the profile's policy tables, the guest's answers parsed as hostile data,
`--downloads DIR` that never leaves DIR, volumes and their lock, and dispod's endpoints end to end over the
fake machinery (whose "guest" is a directory on the host, where the real guest tool, files.sh, runs)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from dispo import guest, profiles
from dispo.cli import opener
from dispo.config import Config
from dispo.errors import Conflict, InvalidInput, NotFound, Refused, TooLarge
from dispo.features import Features
from dispo.infra.journal import Journal
from dispo.infra.txn import transaction
from dispo.names import new_session_id
from dispo.runtime import guestio
from dispo.runtime.guestio import check_guest_name, host_name, parse_listing
from dispo.runtime.live import CancelToken, SessionState
from dispo.runtime.request import build, from_json
from dispo.runtime.saver import DownloadSaver, open_directory
from dispo.storage import volumes
from tests import fakes
from tests.fakeworld import (
    Running,
    cfg,
    serving,
    wait_state,
)

__all__ = ["cfg"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

GUEST_TOOL = Path(guest.__file__).parent / "files.sh"


# -- the profile's policy ---------------------------------------------------------------------------------
def test_features_from_a_profile_and_their_kernel_arguments() -> None:
    assert Features().cmdline() == ()
    f = Features.from_profile({"audio": True, "keep_path": ".config/x", "clipboard": {"from_guest": False,
                              "max_bytes": 100}, "downloads": {"enabled": False}}, where="p.toml")
    assert f.cmdline() == ("dispo.clip=in", "dispo.clipmax=100", "dispo.downloads=0", "dispo.audio=1")
    both_off = Features(clipboard_to_guest=False, clipboard_from_guest=False)
    assert both_off.cmdline() == ("dispo.clip=none",)


@pytest.mark.parametrize("data, words", [
    ({"clipboard": {"colour": 1}}, "unknown key 'colour'"),
    ({"clipboard": {"to_guest": "yes"}}, "to_guest must be true or false"),
    ({"uploads": {"max_mib": 0}}, "max_mib must be an integer"),
    ({"downloads": []}, "[downloads] must be a table"),
    ({"audio": 1}, "'audio' must be true or false"),
    ({"keep_path": "../etc"}, "not a path below the home directory"),
    ({"keep_path": "/root"}, "not a path below the home directory"),
    ({"keep_path": "a b"}, "not a path below the home directory"),
])
def test_bad_feature_settings_are_one_line_errors(data: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput) as e:
        Features.from_profile(data, where="p.toml")
    assert words in e.value.one_line() and "p.toml" in e.value.one_line()


def test_builtin_browsers_keep_their_profile_directory_and_have_no_sound_by_default() -> None:
    assert profiles.find("chromium").features.keep_path == ".config/chromium"
    assert profiles.find("firefox").features.keep_path == ".mozilla"
    assert not profiles.find("chromium").features.audio


def test_keep_needs_a_profile_that_names_what_to_keep(cfg: Config) -> None:
    with pytest.raises(InvalidInput, match="names nothing to keep"):
        build(cfg, image="minimal", command=["true"], keep="vol")
    with pytest.raises(InvalidInput, match="keep must be a string"):
        from_json(cfg, {"image": "minimal", "command": ["true"], "keep": 3})
    (cfg.profiles_dir / "kp.toml").write_text(fakes.CHROMIUM_PROFILE + 'keep_path = ".config/app"\n')
    with pytest.raises(InvalidInput, match="invalid volume name"):
        build(cfg, profile="kp", keep="../x")
    req = build(cfg, profile="kp", keep="vol1")
    assert req.keep == "vol1" and "dispo.keep=.config/app" in req.cmdline()


# -- guest answers ------------------------------------------------------------------------------------------
def test_a_listing_from_the_guest_is_parsed_as_hostile_data() -> None:
    raw = (b"10/a.bin\0" b"0/b.iso\0" b"77/b.iso.part\0" b"5/c.zip.crdownload\0" b"x/bad-size\0" b"3/..\0"
           b"4/\0" b"nonsense\0" b"9/new\nline\0" + b"1/" + b"n" * 300 + b"\0")
    got = {d.name: (d.size, d.complete) for d in parse_listing(raw)}
    assert got == {"a.bin": (10, True), "b.iso": (0, False), "c.zip": (5, False), "new\nline": (9, True)}
    many = b"".join(b"1/f%d\0" % i for i in range(5000))
    assert len(parse_listing(many)) == guestio.MAX_LISTED


@pytest.mark.parametrize("name, safe", [
    ("../../escape me.bin", "_.._escape me.bin"), (".bashrc", "bashrc"), ("-rf", "rf"), ("a\x1b[31m", "a_[31m"),
    ("..", "download"), ("", "download"), ("dir/file", "dir_file"), ("trailing. ", "trailing"),
    ("x" * 300, "x" * 200), ("bidi\u202egnp.exe", "bidi_gnp.exe"),
])
def test_host_names_stay_inside_a_directory(name: str, safe: str) -> None:
    assert host_name(name) == safe


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b", "x" * 256])
def test_guest_names_that_are_not_one_file_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        check_guest_name(name)


# -- --downloads DIR ----------------------------------------------------------------------------------------
def _saver(directory: Path, files: dict[str, bytes], events: list[str], max_bytes: int = 1 << 20) -> DownloadSaver:
    @contextlib.contextmanager
    def opener_(name: str) -> Iterator[Iterator[bytes]]:
        yield iter([files[name][:3], files[name][3:]])

    return DownloadSaver(directory, open_directory(directory), lister=lambda: [
        {"name": n, "size": len(d), "complete": True} for n, d in files.items()], opener=opener_,
        max_bytes=max_bytes, on_saved=lambda n, s, size: events.append(f"saved {s}"),
        on_error=lambda text: events.append(f"error {text}"))


def test_downloads_dir_never_follows_a_link_or_leaves_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / "report.pdf").symlink_to(victim)  # planted by someone who can write DIR
    events: list[str] = []
    saver = _saver(out, {"report.pdf": b"PDF-1", "../../x.sh": b"#!/bin/sh", ".profile": b"p"}, events)
    saver.poll()
    saver.poll()  # each file once
    assert victim.read_text() == "precious" and (out / "report.pdf").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["_.._x.sh", "profile", "report (1).pdf", "report.pdf"]
    assert (out / "report (1).pdf").read_bytes() == b"PDF-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]
    assert len(events) == 3 and all(e.startswith("saved") for e in events)
    saver.stop()


def test_downloads_dir_refuses_what_is_too_big_and_must_exist(tmp_path: Path) -> None:
    events: list[str] = []
    _saver(tmp_path, {"big.iso": b"x" * 100}, events, max_bytes=10).poll()
    assert events and "not copied" in events[0] and not (tmp_path / "big.iso").exists()
    with pytest.raises(InvalidInput, match="must be an existing directory"):
        open_directory(tmp_path / "missing")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(InvalidInput):
        open_directory(tmp_path / "link")


# -- volumes --------------------------------------------------------------------------------------------------
@pytest.mark.root
def test_a_volume_is_made_once_locked_while_used_and_removed_on_request(cfg: Config) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the journal's state dir")
    with transaction(cfg, purpose="session", session_id="aaaa0001") as tx:
        path = volumes.attach(tx, "vol1")
        label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(path)], capture_output=True, text=True,
                               check=False).stdout.strip()
        assert label == volumes.LABEL
        assert [(v.name, v.in_use) for v in volumes.list_volumes(cfg)] == [("vol1", True)]
        with pytest.raises(Conflict, match="in use"):
            volumes.remove(cfg, "vol1")
        with transaction(cfg, purpose="session", session_id="aaaa0002") as tx2, \
                pytest.raises(Conflict, match="in use by another session"):
            volumes.attach(tx2, "vol1")
    assert path.is_file()  # kept after the session's teardown
    assert [(v.name, v.in_use) for v in volumes.list_volumes(cfg)] == [("vol1", False)]
    with transaction(cfg, purpose="session", session_id="aaaa0003") as tx3:
        assert volumes.attach(tx3, "vol1") == path  # the same volume, not a new one
    volumes.remove(cfg, "vol1")
    assert volumes.list_volumes(cfg) == [] and not path.exists()
    with pytest.raises(NotFound):
        volumes.remove(cfg, "vol1")


# -- dispod's endpoints over the fake machinery, the real guest tool ------------------------------------------
@pytest.fixture
def tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's files.sh, run in the fake guest's directory as its home."""
    wrapper = tmp_path / "dispo-files"
    wrapper.write_text(f'#!/bin/sh\nHOME=$PWD exec sh {GUEST_TOOL} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(guest, "FILES_PATH", str(wrapper))


LOCKED = fakes.CHROMIUM_PROFILE + """
[clipboard]
to_guest = false
from_guest = false
[downloads]
enabled = false
[uploads]
enabled = false
max_mib = 1
"""


def _home(running: Running, sid: str) -> Path:
    assert running.dispod.service is not None
    live = running.dispod.service.live(sid)
    assert isinstance(live.channel, fakes.FakeChannel)
    return live.channel.home


def test_downloads_uploads_and_refusals_through_the_api(cfg: Config, tool: None) -> None:
    (cfg.profiles_dir / "locked.toml").write_text(LOCKED)
    with serving(cfg) as svc:
        sid = svc.uds.create_session({"profile": "chromium", "url": "https://example.org/"})["id"]
        wait_state(svc.uds, sid, "running")
        home = _home(svc, sid)
        (home / "Downloads").mkdir()
        (home / "Downloads" / "a.bin").write_bytes(b"A" * 70000)
        (home / "Downloads" / "b.iso").write_bytes(b"")
        (home / "Downloads" / "b.iso.part").write_bytes(b"BB")
        (home / "Downloads" / "link").symlink_to("/etc/hostname")
        listed = {d["name"]: d for d in svc.uds.downloads(sid)}
        assert set(listed) == {"a.bin", "b.iso"} and listed["b.iso"]["complete"] is False
        with svc.uds.download(sid, "a.bin") as chunks:
            assert b"".join(chunks) == b"A" * 70000
        for name, error in (("link", NotFound), ("b.iso", NotFound), ("..", InvalidInput)):
            with pytest.raises(error), svc.uds.download(sid, name) as chunks:
                b"".join(chunks)
        assert svc.uds.upload(sid, "up.txt", b"hello")["name"] == "up.txt"
        assert svc.uds.upload(sid, "up.txt", b"again")["name"] == "1-up.txt"
        assert svc.uds.upload(sid, "../evil", b"x")["name"] == "_evil"
        assert (home / "Uploads" / "up.txt").read_bytes() == b"hello"
        assert sorted(p.name for p in (home / "Uploads").iterdir()) == ["1-up.txt", "_evil", "up.txt"]

        locked = svc.uds.create_session({"profile": "locked"})["id"]
        wait_state(svc.uds, locked, "running")
        for call in (lambda: svc.uds.downloads(locked), lambda: svc.uds.clipboard(locked),
                     lambda: svc.uds.set_clipboard(locked, "x"), lambda: svc.uds.upload(locked, "a", b"a")):
            with pytest.raises(Refused):
                call()
        assert not (_home(svc, locked) / "Uploads").exists()
        big = httpx.post(f"{svc.base}/v1/sessions/{sid}/uploads?name=big", content=b"x" * 10,
                         headers={"Authorization": f"Bearer {svc.dispod.token}"})
        assert big.status_code == 201
        svc.uds.delete(sid, wait=True)
        svc.uds.delete(locked, wait=True)


def test_an_upload_over_the_cap_is_refused_before_the_guest_sees_it(cfg: Config, tool: None) -> None:
    (cfg.profiles_dir / "small.toml").write_text(fakes.CHROMIUM_PROFILE + "[uploads]\nmax_mib = 1\n")
    with serving(cfg) as svc:
        sid = svc.uds.create_session({"profile": "small"})["id"]
        wait_state(svc.uds, sid, "running")
        with pytest.raises(TooLarge):
            svc.uds.upload(sid, "big.bin", b"x" * ((1 << 20) + 1))
        assert not (_home(svc, sid) / "Uploads").exists()
        svc.uds.delete(sid, wait=True)


# -- dispo open ---------------------------------------------------------------------------------------------
def test_dispo_open_refuses_a_loop_and_what_is_not_a_web_link(cfg: Config, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setenv(opener.LOOP_ENV, "1")
    with pytest.raises(InvalidInput, match="viewer came back"):
        opener.cmd_open(argparse.Namespace(url="http://example.org/", profile="chromium"), cfg)
    monkeypatch.delenv(opener.LOOP_ENV)
    for bad in ("file:///etc/passwd", "about:blank", "javascript:alert(1)"):
        with pytest.raises(InvalidInput):
            opener.cmd_open(argparse.Namespace(url=bad, profile="chromium"), cfg)


def _live(tmp_path: Path, *, guest: bool) -> SimpleNamespace:
    """What GuestIO reads of a LiveSession: a running one, with the fake guest or (guest=False) none yet, and its
    journal (where each guest command's process is recorded while it runs)."""
    channel = fakes.FakeChannel(fakes.guest_home(tmp_path / "home"), tmp_path / "console.log") if guest else None
    journal = Journal.create(tmp_path / "state", new_session_id(), {})
    return SimpleNamespace(id="1a2b3c4d", channel=channel, journal=journal, ended=False, cancel=CancelToken(),
                           state=SessionState.RUNNING if guest else SessionState.STARTING,
                           request=SimpleNamespace(features=Features()), touch=lambda: None)


def test_guest_io_answers_409_while_there_is_no_guest_to_ask(tmp_path: Path) -> None:
    """A session that exists but has no guest yet, or is ending, answers 409 (not 404, which says "no such
    session", and not the guest's failure): nothing is sent to a guest that is going away."""
    live = _live(tmp_path, guest=False)
    io = guestio.GuestIO(live)
    with pytest.raises(Conflict, match="no running guest yet"):
        io.clipboard()
    live.channel, live.state = _live(tmp_path, guest=True).channel, SessionState.RUNNING
    io.set_clipboard("copied")
    assert io.clipboard() == "copied"
    live.state = SessionState.STOPPING  # its app ended, or DELETE: the guest is going away
    for call in (io.clipboard, io.downloads, lambda: _upload(io, "a.txt", b"a"), lambda: io.set_clipboard("x")):
        with pytest.raises(Conflict, match="is ending"):
            call()
    assert not (tmp_path / "home" / "Uploads").exists()
    live.state = SessionState.RUNNING
    live.cancel.set("stopped through the API (DELETE)")  # asked to end, before its state says so
    with pytest.raises(Conflict, match="is ending"):
        io.clipboard()



def test_an_upload_whose_session_ends_under_it_answers_409(tmp_path: Path) -> None:
    """The guest going away in the middle of an upload, because its session is ending, is the caller's late
    request (409), not the guest's failure (502; the API fuzzer found this race)."""
    live = _live(tmp_path, guest=True)
    io = guestio.GuestIO(live)
    up = io.begin_upload("late.txt", 4)
    try:
        up.write(b"ab")
        live.state = SessionState.STOPPING
        up._cmd.proc.kill()  # the guest's side of the command goes with its guest
        up._cmd.proc.wait(5)
        with pytest.raises(Conflict, match="is ending"):
            up.write(b"cd")
            up.finish()
    finally:
        up.abort()
    assert not (tmp_path / "home" / "Uploads" / "late.txt").exists()

def _upload(io: guestio.GuestIO, name: str, data: bytes) -> str:
    """An upload as dispod streams one: begun with its size, written, finished."""
    up = io.begin_upload(name, len(data))
    try:
        up.write(data)
        return up.finish()
    finally:
        up.abort()


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_an_upload_name_is_1_to_255_characters(tmp_path: Path, name: str) -> None:
    io = guestio.GuestIO(_live(tmp_path, guest=True))
    with pytest.raises(InvalidInput, match="1 to 255 characters"):
        _upload(io, name, b"a")
    assert _upload(io, "x" * 255, b"a") == "x" * 200  # host_name keeps 200 bytes


def test_a_download_name_too_long_to_exist_is_not_found(tmp_path: Path) -> None:
    """The document counts a name's characters (JSON Schema cannot count bytes): 255 of them that are more
    than 255 bytes name no file the guest can have, so that is a 404, not a refusal of a valid request."""
    io = guestio.GuestIO(_live(tmp_path, guest=True))
    with pytest.raises(NotFound, match="no download named"):
        io.download("é" * 200)
    for bad in ("", "..", "a/b", "a\0b"):
        with pytest.raises(InvalidInput, match="invalid file name"):
            io.download(bad)
