"""The session journal: record-before-create, reverse unwind that keeps going, gc after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dispo.errors import InvalidInput, JournalError, TeardownError
from dispo.infra import journal
from dispo.infra.journal import Journal
from dispo.infra.undo import undoer
from dispo.names import new_session_id

ORDER: list[str] = []


@undoer("test-log")
def _undo_log(args: Mapping[str, str]) -> None:
    ORDER.append(args["name"])
    Path(args["path"]).unlink(missing_ok=True)


@undoer("test-fail")
def _undo_fail(args: Mapping[str, str]) -> None:
    if Path(args["flag"]).exists():
        raise OSError("device busy")


def _state(j: Journal) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((j.path / journal.STATE_FILE).read_text())
    return data


def test_record_is_written_before_the_object_exists(tmp_path: Path) -> None:
    j = Journal.create(tmp_path, new_session_id(), {"purpose": "test"})
    obj = tmp_path / "obj"
    j.record("path", path=str(obj))
    # The object does not exist yet, but the journal already knows how to undo it.
    assert not obj.exists()
    assert _state(j)["resources"][0] == {"seq": 1, "kind": "path", "args": {"path": str(obj)}}
    assert _state(j)["meta"]["owner_pid"] == os.getpid()
    obj.write_text("x")
    j.unwind()
    assert not obj.exists()
    assert not j.path.exists()


def test_unknown_kind_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    j = Journal.create(tmp_path, new_session_id(), {})
    with pytest.raises(JournalError, match="no undo action"):
        j.record("no-such-kind", x="1")
    assert _state(j)["resources"] == []
    j.unwind()


def test_unwind_reverse_order_and_keeps_going(tmp_path: Path) -> None:
    ORDER.clear()
    j = Journal.create(tmp_path, new_session_id(), {})
    flag = tmp_path / "busy"
    flag.touch()
    for name in ("first", "second"):
        (tmp_path / name).touch()
        j.record("test-log", name=name, path=str(tmp_path / name))
    j.record("test-fail", flag=str(flag))
    for name in ("third",):
        (tmp_path / name).touch()
        j.record("test-log", name=name, path=str(tmp_path / name))
    with pytest.raises(TeardownError) as e:
        j.unwind()
    assert ORDER == ["third", "second", "first"]  # reverse, and past the failing step
    assert len(e.value.errors) == 1 and "device busy" in str(e.value)
    # The journal stays, holding only the step that failed, for gc to retry.
    left = Journal.load(j.path)
    assert [x.kind for x in left.entries] == ["test-fail"]
    report = journal.gc(tmp_path)
    assert report.failed and not report.reclaimed
    flag.unlink()  # the cause goes away
    report = journal.gc(tmp_path)
    assert report.reclaimed == [j.session_id]
    assert not j.path.exists()


def test_live_session_is_not_collected(tmp_path: Path) -> None:
    j = Journal.create(tmp_path, new_session_id(), {"purpose": "test"})
    obj = tmp_path / "obj"
    j.record("path", path=str(obj))
    obj.touch()
    assert journal.gc(tmp_path).reclaimed == []
    assert obj.exists()
    infos = list(journal.scan(tmp_path))
    assert [(i.session_id, i.alive) for i in infos] == [(j.session_id, True)]
    j.unwind()
    assert list(journal.scan(tmp_path)) == []


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dispo.infra.journal import Journal
    state, work, sid = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    j = Journal.create(state, sid, {"purpose": "crash-test"})
    for i in range(3):
        p = work / f"obj{i}"
        j.record("path", path=str(p))
        p.mkdir()
    j.record("path", path=str(work / "never-created"))
    print("ready", flush=True)
    time.sleep(600)
""")


def test_gc_after_sigkill(tmp_path: Path) -> None:
    state, work = tmp_path / "state", tmp_path / "work"
    work.mkdir()
    sid = new_session_id()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(state), str(work), sid], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        before = sorted(p.name for p in work.iterdir())
        assert before == ["obj0", "obj1", "obj2"]
        assert journal.gc(state).reclaimed == []  # owner alive: untouched
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        infos = list(journal.scan(state))
        assert [(i.session_id, i.alive) for i in infos] == [(sid, False)]
        report = journal.gc(state)
        assert report.reclaimed == [sid]
        assert len(report.undone) == 4
        assert sorted(p.name for p in work.iterdir()) == []
        assert not (state / "sessions" / sid).exists()
        assert journal.gc(state).reclaimed == []  # twice is harmless
    finally:
        child.kill()
        child.wait()


def test_nascent_dir_swept_only_when_old(tmp_path: Path) -> None:
    root = journal.sessions_root(tmp_path)
    root.mkdir(parents=True)
    young, old = root / ".new-aaaaaaaa", root / ".new-bbbbbbbb"
    young.mkdir()
    old.mkdir()
    (old / journal.LOCK_FILE).touch()
    past = time.time() - 3600
    os.utime(old, (past, past))
    journal.gc(tmp_path)
    assert young.exists() and not old.exists()


@pytest.mark.parametrize("bad", ["0123abcd\n", "0123abcd ", "\n0123abcd", "0123ABCD", "0123abc"])
def test_session_ids_and_names_are_matched_whole(bad: str) -> None:
    from dispo.names import check_name, check_session_id

    with pytest.raises(InvalidInput, match="invalid session id"):
        check_session_id(bad)
    with pytest.raises(InvalidInput, match="invalid image name"):
        check_name("minimal\n" if bad.endswith("\n") else "\nminimal", what="image name")


def test_unwind_goes_on_when_the_journal_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (or no file descriptors left) while unwinding: every undo step still runs."""
    j = Journal.create(tmp_path, new_session_id(), {})
    objs = [tmp_path / f"o{i}" for i in range(3)]
    for i, obj in enumerate(objs):
        j.record("test-log", name=f"o{i}", path=str(obj))
        obj.write_text("x")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(j, "_write", full)
    ORDER.clear()
    j.unwind()
    assert ORDER == ["o2", "o1", "o0"]
    assert not any(o.exists() for o in objs)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"id": "0123abcd", "resources": [{"seq": 1}]}',
                                     '{"id": "../../etc", "resources": []}'])
def test_a_bad_journal_does_not_stop_gc_or_scan_for_the_others(tmp_path: Path, content: str) -> None:
    bad = journal.sessions_root(tmp_path) / "0badbad0"
    good = Journal.create(tmp_path, new_session_id(), {"purpose": "test"})
    obj = tmp_path / "obj"
    good.record("path", path=str(obj))
    obj.write_text("x")
    good.release()  # its owner "died"
    bad.mkdir(parents=True)
    (bad / journal.STATE_FILE).write_text(content)
    assert [i.session_id for i in journal.scan(tmp_path)] == [good.session_id]
    report = journal.gc(tmp_path)
    assert report.reclaimed == [good.session_id] and not obj.exists()
    assert len(report.failed) == 1 and "0badbad0" in report.failed[0].message
