"""The Python SDK (dispo.sdk, docs/sdk.md) and its pytest plugin, against dispod on the fake machinery
(tests/fakes.py: the guest is a directory on the host, where the real dispo-files runs).

What is asserted is what a program sees: sessions that are gone after their with block whatever the block did,
with a clean receipt; dispod's errors as the classes of errors.py; files and clipboard that arrive.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import dispo
from dispo import errors, sdk
from dispo.config import Config
from dispo.errors import DispoError, InvalidInput, NotFound, PermissionProblem, ServiceError, VmmError
from dispo.runtime.request import from_json
from tests import fakes
from tests.fakeworld import Running, cfg, leftovers, serving, svc

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

pytest_plugins = ("pytester",)


def home(svc: Running, sid: str) -> Path:
    """The fake guest's home directory (its ~/Downloads and ~/Uploads)."""
    assert svc.dispod.service is not None
    channel = svc.dispod.service.live(sid).channel
    assert isinstance(channel, fakes.FakeChannel)
    return channel.home


def gone(svc: Running, cfg: Config, sid: str) -> None:
    """The session ended through the API and nothing it made is left."""
    status = svc.uds.session(sid)
    assert status["state"] == "ended", status
    assert status["end_reason"] == "stopped through the API (DELETE)"
    assert sid not in [s["id"] for s in svc.uds.sessions()]
    assert fakes.fake_vmm_pids(sid) == []
    assert sid not in leftovers(cfg)["journals"]


# -- import ---------------------------------------------------------------------------------------------
def test_import_dispo_loads_no_http_library_until_the_sdk_is_used() -> None:
    probe = ("import sys, dispo\n"
             "print(sorted(m for m in ('httpx', 'aiohttp', 'dispo.sdk', 'dispo.client') if m in sys.modules))\n"
             "dispo.connect\n"
             "print('httpx' in sys.modules, dispo.connect is dispo.sdk.connect)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True True"]
    with pytest.raises(AttributeError):
        dispo.nothing_here  # noqa: B018


# -- sessions end on exit ------------------------------------------------------------------------------------
def test_a_session_ends_on_exit_even_when_the_block_raises(svc: Running, cfg: Config) -> None:
    with dispo.connect(config=cfg) as d:  # this host's dispod: the socket in the config's state dir
        assert d.where == f"unix:{svc.dispod.paths.socket}"
        with pytest.raises(RuntimeError, match="the program's own failure"), \
                d.session("chromium", url="https://example.org/") as s:
            assert s.state == "starting" and s.viewer_url
            assert s.wait_ready() is s
            assert s.state == "running" and s.cdp_url is None and s.bidi_url is None
            assert svc.uds.session(s.id)["state"] == "running"
            raise RuntimeError("the program's own failure")
        assert s.ended
        gone(svc, cfg, s.id)
        receipt = s.receipt()
        assert receipt["clean"] is True and receipt["leftovers"] == [] and receipt["checked"] > 0
        assert s.end()["state"] == "ended"  # ending again asks nothing and changes nothing


def test_a_session_ends_on_exit_when_the_block_succeeds(svc: Running, cfg: Config) -> None:
    with dispo.connect(config=cfg) as d, d.session("chromium") as s:
        s.wait_ready()
        with pytest.raises(errors.Conflict, match="has not ended"):
            s.receipt()
    gone(svc, cfg, s.id)
    assert s.receipt()["clean"] is True


def test_the_client_ends_the_sessions_it_started_and_left_running(svc: Running, cfg: Config) -> None:
    with dispo.connect(config=cfg) as d:
        left = d.session("chromium")
        other = svc.uds.create_session({"profile": "chromium"})["id"]  # not this client's: stays
        assert other in [s.id for s in d.sessions()]
    gone(svc, cfg, left.id)
    assert left.receipt()["clean"] is True
    assert svc.uds.session(other)["state"] != "ended"
    svc.uds.delete(other, wait=True)


def test_async_session_ends_on_exit_even_when_the_block_raises(svc: Running, cfg: Config) -> None:
    async def program() -> tuple[dispo.AsyncSession, dispo.AsyncSession]:
        async with dispo.AsyncClient(config=cfg) as d:
            with pytest.raises(RuntimeError, match="the program's own failure"):
                async with d.session("chromium", url="https://example.org/") as s:
                    assert await s.wait_ready() is s
                    assert s.state == "running" and s.viewer_url and s.cdp_url is None
                    raise RuntimeError("the program's own failure")
            assert s.ended
            left = await d.session("chromium")  # awaited, not entered: the client's close ends it
            assert (await d.attach(left.id)).id == left.id
            return s, left

    s, left = asyncio.run(program())
    for one in (s, left):
        gone(svc, cfg, one.id)
        assert one.receipt()["clean"] is True


def test_an_error_while_ending_rides_along_with_the_blocks_own(svc: Running, cfg: Config,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ServiceError("dispod went away")

    with dispo.connect(config=cfg) as d:
        with pytest.raises(RuntimeError, match="the program's own failure") as raised, d.session("chromium") as s:
            monkeypatch.setattr(d.api, "delete", unreachable)
            raise RuntimeError("the program's own failure")
        assert raised.value.__notes__ == [f"ending session {s.id} failed too: ServiceError: dispod went away"]
        assert not s.ended
        monkeypatch.undo()
    gone(svc, cfg, s.id)  # the client's close ended what the block could not


def test_a_session_ended_while_it_starts(cfg: Config) -> None:
    with serving(cfg, machinery=fakes.slow_machinery()) as svc, dispo.connect(config=cfg) as d:
        with d.session("chromium") as s:
            assert s.state == "starting"
        assert svc.uds.session(s.id)["state"] == "ended"
        assert s.receipt()["clean"] is True and fakes.fake_vmm_pids(s.id) == []


def test_async_sessions_side_by_side(svc: Running, cfg: Config) -> None:
    async def program() -> list[str]:
        async with dispo.AsyncClient(config=cfg) as d:
            async def one(n: int) -> str:
                async with d.session("chromium", name=f"side-{n}") as s:
                    await s.wait_ready()
                    assert len(await d.sessions()) >= 1
                    return s.id
            return await asyncio.gather(*(one(n) for n in range(3)))

    ids = asyncio.run(program())
    assert len(set(ids)) == 3
    for sid in ids:
        gone(svc, cfg, sid)


def test_async_session_ends_when_its_task_is_cancelled(svc: Running, cfg: Config) -> None:
    async def program() -> str:
        started = asyncio.Event()
        box: list[str] = []

        async def user(d: dispo.AsyncClient) -> None:
            async with d.session("chromium") as s:
                box.append(s.id)
                await s.wait_ready()
                started.set()
                await asyncio.sleep(3600)

        async with dispo.AsyncClient(config=cfg) as d:
            task = asyncio.create_task(user(d))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return box[0]

    gone(svc, cfg, asyncio.run(program()))


# -- errors ----------------------------------------------------------------------------------------------
def test_dispods_errors_arrive_as_their_own_class(svc: Running, cfg: Config) -> None:
    with pytest.raises(DispoError) as in_process:  # what `dispo run nosuch` gets, without dispod
        from_json(cfg, {"profile": "nosuch"})
    with dispo.connect(config=cfg) as d:
        with pytest.raises(NotFound) as through_sdk:
            d.session("nosuch")
        assert type(through_sdk.value) is type(in_process.value)
        assert through_sdk.value.one_line() == in_process.value.one_line()
        with pytest.raises(InvalidInput, match="colour"):
            d.session("chromium", colour="red")
        with pytest.raises(NotFound):
            d.attach("0badc0de")
        assert d.sessions() == []  # nothing was started by the refused requests


def test_a_session_that_fails_to_start_raises_its_error_from_wait_ready(cfg: Config) -> None:
    with serving(cfg, machinery=fakes.slow_machinery()) as svc, dispo.connect(config=cfg) as d:
        with d.session("chromium", ready_timeout_s=1) as s:
            with pytest.raises(VmmError, match="not ready within"):
                s.wait_ready()
            assert s.ended and s.receipt()["clean"] is True
        assert svc.uds.session(s.id)["state"] == "ended"
        assert fakes.fake_vmm_pids(s.id) == []


def test_tcp_needs_the_right_token(svc: Running, cfg: Config) -> None:
    wrong_token = "not-" + svc.token
    for token in (wrong_token, None):
        with pytest.raises(PermissionProblem, match="access token"):
            dispo.connect(svc.base, token=token)

    async def wrong() -> None:
        async with dispo.AsyncClient(svc.base, token=wrong_token):
            pass
    with pytest.raises(PermissionProblem):
        asyncio.run(wrong())
    with dispo.connect(svc.base, token=svc.token) as d, d.session("chromium") as s:
        assert d.where == svc.base
        s.wait_ready()
    gone(svc, cfg, s.id)


def test_an_address_that_is_none_of_dispods_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not an address of dispod") as bad:
        dispo.connect("ftp://host")
    assert "http://HOST:PORT" in bad.value.hint
    empty = fakes.config(tmp_path)
    with pytest.raises(ServiceError, match="no dispod socket at") as none:
        dispo.connect(config=empty)
    assert "dispo.connect('http://HOST:8686'" in none.value.hint
    with pytest.raises(ServiceError, match="did not answer"):
        dispo.connect(f"unix:{tmp_path / 'nothing.sock'}")


# -- files and clipboard -------------------------------------------------------------------------------------
def test_downloads_uploads_and_clipboard(svc: Running, cfg: Config, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    local = tmp_path / "local"
    local.mkdir()
    with dispo.connect(config=cfg) as d, d.session("chromium") as s:
        s.wait_ready()
        guest = home(svc, s.id)
        (guest / "Downloads").mkdir()
        (guest / "Downloads" / "report.bin").write_bytes(payload)
        (guest / "Downloads" / "half.iso").write_bytes(b"")
        (guest / "Downloads" / "half.iso.part").write_bytes(b"12")
        assert sorted(s.downloads(), key=lambda x: x.name) == [
            sdk.Download("half.iso", 0, False), sdk.Download("report.bin", len(payload), True)]
        into_dir = s.download("report.bin", to=local)
        assert into_dir == local / "report.bin"
        assert hashlib.sha256(into_dir.read_bytes()).digest() == hashlib.sha256(payload).digest()
        assert s.download("report.bin", to=local / "named.bin").read_bytes() == payload
        with pytest.raises(NotFound):
            s.download("half.iso", to=local)
        with pytest.raises(InvalidInput):
            s.download("..", to=local)
        assert sorted(p.name for p in local.iterdir()) == ["named.bin", "report.bin"]  # no partial file

        (local / "data.csv").write_text("a,b\n1,2\n")
        assert s.upload(local / "data.csv") == "data.csv"
        assert s.upload(str(local / "data.csv")) == "1-data.csv"
        assert s.upload(b"raw bytes", name="raw.txt") == "raw.txt"
        assert (guest / "Uploads" / "data.csv").read_text() == "a,b\n1,2\n"
        assert (guest / "Uploads" / "raw.txt").read_bytes() == b"raw bytes"
        with pytest.raises(InvalidInput, match="needs name="):
            s.upload(b"x")
        with pytest.raises(InvalidInput, match="is not a file"):
            s.upload(local / "missing.csv")

        s.clipboard = "copied from the program"
        assert s.clipboard == "copied from the program"
        assert s.get_clipboard() == "copied from the program"
    gone(svc, cfg, s.id)
    assert s.receipt()["clean"] is True


def test_async_downloads_uploads_and_clipboard(svc: Running, cfg: Config, tmp_path: Path) -> None:
    payload = b"B" * 200_000
    (tmp_path / "up.bin").write_bytes(payload)

    async def program() -> str:
        async with dispo.AsyncClient(config=cfg) as d, d.session("chromium") as s:
            await s.wait_ready()
            guest = home(svc, s.id)
            (guest / "Downloads").mkdir()
            (guest / "Downloads" / "file.bin").write_bytes(payload)
            assert await s.downloads() == [sdk.Download("file.bin", len(payload), True)]
            assert (await s.download("file.bin", to=tmp_path / "got.bin")).read_bytes() == payload
            assert await s.upload(tmp_path / "up.bin") == "up.bin"
            assert (guest / "Uploads" / "up.bin").read_bytes() == payload
            await s.set_clipboard("async text")
            assert await s.get_clipboard() == "async text"
            return s.id

    gone(svc, cfg, asyncio.run(program()))


# -- the pytest plugin ---------------------------------------------------------------------------------------
INNER_TESTS = """
import pytest

def test_one(dispo_browser):
    assert dispo_browser.state == "running" and dispo_browser.viewer_url
    with open("ids.txt", "a") as f:
        f.write(dispo_browser.id + "\\n")

@pytest.mark.dispo(url="https://example.org/", name="marked")
def test_two(dispo_browser):
    assert dispo_browser.status["name"] == "marked"
    with open("ids.txt", "a") as f:
        f.write(dispo_browser.id + "\\n")

def test_failing(dispo_browser):
    with open("ids.txt", "a") as f:
        f.write(dispo_browser.id + "\\n")
    assert False, "the test's own failure"

def test_without_it():
    pass
"""


def test_the_pytest_fixture_gives_each_test_a_fresh_session_and_ends_it(
        svc: Running, cfg: Config, tmp_path: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPO_CONFIG", str(fakes.config_file(tmp_path)))  # the fixture finds dispod's socket
    pytester.makepyfile(INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*the test's own failure*"])
    ids = (pytester.path / "ids.txt").read_text().split()
    assert len(ids) == 3 and len(set(ids)) == 3
    for sid in ids:
        gone(svc, cfg, sid)


def test_the_pytest_plugin_does_nothing_unless_used(tmp_path: Path, pytester: pytest.Pytester,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPO_STATE_DIR", str(tmp_path / "no-dispod-here"))
    pytester.makepyfile("def test_plain():\n    pass\n\ndef test_wants_it(dispo_browser):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--dispo-profile", "firefox")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ServiceError: no dispod socket at*"])
    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:dispo", "-k", "plain")
    off.assert_outcomes(passed=1, deselected=1)
