"""The exception tree is whole: every DispoError subclass in the package is in errors.ALL_ERRORS, and each one
raised in dispod reaches a client (DispodClient, `dispo run` through dispod) as the same class, with the same
message, hint and fields. dispod runs on the fake machinery in this process (no root, no VM)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
from collections.abc import Callable

import pytest

import dispo
from dispo import errors
from dispo.errors import ALL_ERRORS, DispoError
from dispo.web import api
from tests import fakes
from tests.fakeworld import SLEEP, Running, cfg, svc, until_ended, wait_state

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

# Classes whose constructor takes more than (message, hint=...): an example each, with every field set.
SPECIAL: dict[type[DispoError], Callable[[], DispoError]] = {
    errors.CommandError: lambda: errors.CommandError(["btrfs", "subvolume", "delete", "/x"], 1,
                                                     "noise\nERROR: cannot delete /x", hint="see btrfs(8)"),
    errors.TeardownError: lambda: errors.TeardownError("abc123", [
        ("tap dispo-abc123", errors.NetworkError("ip link del failed", hint="check ip")),
        ("btrfs disk", errors.CommandError(["btrfs"], 2, "busy")),
    ]),
    errors.NotClean: lambda: errors.NotClean("abc123", ["tap dispo-abc123", "nft rule 7"]),
    errors.GuestFailure: lambda: errors.GuestFailure("QEMU exited at once", hint="see the console",
                                                     console_tail="line one\n  line two"),
    errors.ApiError: lambda: errors.ApiError("putGuestBootSource", "PUT", "/boot-source", 400, "bad kernel"),
    errors.Cancelled: lambda: errors.Cancelled("stopped through the API (DELETE)"),
}


def example(cls: type[DispoError]) -> DispoError:
    if cls in SPECIAL:
        return SPECIAL[cls]()
    return cls(f"a {cls.__name__} for the test", hint=f"the hint of a {cls.__name__}")


def every_subclass() -> set[type[DispoError]]:
    for mod in pkgutil.walk_packages(dispo.__path__, "dispo."):
        if mod.name != "dispo.__main__":
            importlib.import_module(mod.name)
    seen: set[type[DispoError]] = set()
    todo = [DispoError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in seen and c.__module__.startswith("dispo.")]
    return seen


def assert_same(got: BaseException, sent: DispoError) -> None:
    assert type(got) is type(sent)
    assert isinstance(got, DispoError)
    assert (got.message, got.hint) == (sent.message, sent.hint)
    assert got.members() == sent.members()  # a TeardownError's steps: each error's class, message and hint


def test_every_error_class_is_in_the_list_and_named_once() -> None:
    found = every_subclass()
    assert sorted(c.__name__ for c in found - set(ALL_ERRORS)) == []
    assert all(c.__module__ == "dispo.errors" for c in found), "the one exception tree is errors.py"
    assert len({c.__name__ for c in ALL_ERRORS}) == len(ALL_ERRORS)  # the name in a problem picks the class
    reserved = {"type", "title", "status", "detail", "instance", "hint", "message"}  # RFC 9457 and to_problem's
    assert [c.__name__ for c in ALL_ERRORS if reserved & set(c.problem_fields)] == []


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_session_error_form_rebuilds_the_same_class(cls: type[DispoError]) -> None:
    """What a session's status and its `ended` event carry (`dispo run` through dispod reads the latter)."""
    sent = example(cls)
    assert_same(errors.from_problem(errors.to_problem(sent)), sent)


def test_each_error_raised_in_dispod_reaches_the_client_as_itself(svc: Running,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with svc.raw_uds() as raw:  # one connection for every class
        for cls in ALL_ERRORS:
            sent = example(cls)

            def fail(_svc: object, error: DispoError = sent) -> list[object]:
                raise error

            monkeypatch.setattr(api, "profile_list", fail)  # GET /v1/profiles raises it in dispod
            with pytest.raises(DispoError) as e:
                svc.uds.profiles()
            assert_same(e.value, sent)
            assert raw.get("/v1/profiles").status_code == cls.http_status, cls.__name__


def test_a_guest_failure_in_dispod_ends_the_session_with_its_console(svc: Running) -> None:
    """`dispo run` through dispod raises the `ended` event's error: a GuestFailure, with the console tail the
    CLI shows above the one-line error."""
    sid = svc.uds.create_session(SLEEP)["id"]
    wait_state(svc.uds, sid, "running")
    for pid in fakes.fake_vmm_pids(sid):
        os.kill(pid, signal.SIGKILL)
    ended = until_ended(svc.uds, sid)[-1].fields
    error = errors.from_problem(ended["error"])
    assert isinstance(error, errors.GuestFailure), ended
    assert "the guest stopped while the command ran" in error.message
    assert "fake guest: booting" in error.console_tail and error.console_tail == ended["console_tail"]
