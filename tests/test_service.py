"""dispod with fake machinery (tests/fakes.py): the REST API, the event stream, viewers, the dashboard, the
service's guards, DispodClient, and dispod as a process (kill -9 and reclaim, one dispod per state dir).

No root, no VM: the fake VMM is a real sleeping process, the fake guest runs commands on the host. What the
tests assert is observable: answers, events, journal directories, session disks, the fake VMM's process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispo import receipt
from dispo.client import DispodClient
from dispo.config import Config
from dispo.errors import Busy, Conflict, InvalidInput, NotFound, PermissionProblem, ServiceError
from dispo.runtime.events import Event, EventKind
from dispo.servicepaths import ServicePaths
from dispo.web.guard import Limits, ListenerKind
from tests import fakes
from tests.fakeworld import (
    SAFETY_S,
    SLEEP,
    Running,
    cfg,
    dispod_ready,
    end_dispod,
    fake_vmms_of,
    leftovers,
    serving,
    spawn_dispod,
    svc,
    until_ended,
    wait_state,
)

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)


def output(events: list[Event], stream: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(e.fields["data"]) for e in events
                    if e.kind is EventKind.OUTPUT and e.fields["stream"] == stream)


# -- sessions through the API --------------------------------------------------------------------------
def test_command_exits_7_then_ended_with_its_status_and_nothing_left(svc: Running, cfg: Config) -> None:
    before = leftovers(cfg)
    created = svc.uds.create_session({"image": "minimal", "command": ["sh", "-c", "echo hi; exit 7"]})
    assert created["state"] == "starting" and created["viewer_url"] is None
    events = until_ended(svc.uds, created["id"])
    assert output(events) == b"hi\n"
    assert events[-1].fields["exit_status"] == 7
    status = svc.uds.session(created["id"])
    assert status["state"] == "ended"
    assert status["exit_status"] == 7
    assert status["end_reason"] == "the command exited with status 7" and status["end_kind"] == "exited"
    assert events[-1].fields["end_kind"] == "exited"
    assert leftovers(cfg) == before
    assert created["id"] not in [s["id"] for s in svc.uds.sessions()]
    assert created["id"] in [s["id"] for s in svc.uds.sessions(all=True)]


def test_delete_ends_a_running_session_and_removes_everything(svc: Running, cfg: Config) -> None:
    before = leftovers(cfg)
    sid = svc.uds.create_session(SLEEP)["id"]
    wait_state(svc.uds, sid, "running")
    assert fakes.fake_vmm_pids(sid)
    assert fake_vmms_of(cfg) == fakes.fake_vmm_pids(sid)  # the listing sees this world's VMM
    assert (cfg.state_dir / "sessions" / sid).is_dir() and (cfg.disks_dir / sid).exists()
    assert leftovers(cfg) != before
    gone = svc.uds.delete(sid, wait=True)
    assert gone["state"] == "ended"
    assert gone["end_reason"] == "stopped through the API (DELETE)" and gone["end_kind"] == "user"
    assert fakes.fake_vmm_pids(sid) == []
    assert leftovers(cfg) == before
    assert svc.uds.delete(sid)["state"] == "ended"  # deleting again is harmless


def test_delete_without_wait_answers_202_while_it_ends(svc: Running) -> None:
    sid = svc.uds.create_session(SLEEP)["id"]
    wait_state(svc.uds, sid, "running")
    with svc.raw_uds() as http:
        r = http.delete(f"/v1/sessions/{sid}")
    assert r.status_code in (200, 202)
    assert r.json()["state"] in ("stopping", "ended")
    assert wait_state(svc.uds, sid, "ended")["end_reason"] == "stopped through the API (DELETE)"


def test_max_sessions_answers_429_past_it(cfg: Config) -> None:
    with serving(cfg, max_sessions=2) as svc, svc.raw_uds() as http:
        def post(_: int) -> httpx.Response:
            return http.post("/v1/sessions", json=SLEEP)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(post, range(6)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [201, 201, 429, 429, 429, 429]
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["title"] == "Busy"
        with pytest.raises(Busy, match="max_sessions = 2"):
            svc.uds.create_session(SLEEP)
        first = next(r.json()["id"] for r in answers if r.status_code == 201)
        svc.uds.delete(first, wait=True)
        assert http.post("/v1/sessions", json=SLEEP).status_code == 201  # room again


@pytest.mark.parametrize(("body", "status", "title", "detail"), [
    ({"image": "minimal", "command": ["true"], "colour": "red"}, 400, "InvalidInput", "unknown key(s): colour"),
    ({"profile": "nope"}, 404, "NotFound", "no profile named 'nope'"),
    ({"profile": "chromium", "display": "x11"}, 400, "InvalidInput", "x11 needs 'dispo run' in-process"),
    ({"image": "minimal", "command": "echo hi"}, 400, "InvalidInput", "command must be a list of strings"),
    ({"image": "minimal", "command": ["true"], "memory_mib": 1}, 400, "InvalidInput", "memory_mib 1 is out of range"),
    ({"image": "../etc", "command": ["true"]}, 400, "InvalidInput", "invalid image name"),
    ([1, 2], 400, "InvalidInput", "the body must be a JSON object"),
    # What the OpenAPI document refuses, dispod refuses: a profile brings its own command; a key given is a
    # value of its type (null is not "not given").
    ({"profile": "chromium", "command": []}, 400, "InvalidInput", "no shell), not empty"),
    ({"profile": None, "image": "minimal", "command": ["true"]}, 400, "InvalidInput", "profile must be a string"),
    ({"image": "", "command": ["true"]}, 400, "InvalidInput", "image must be a string (not empty)"),
    ({"image": "minimal", "command": ["true"], "vcpus": None}, 400, "InvalidInput", "vcpus must be a number"),
    # A fine request that what it names cannot serve: 409, not 400.
    ({"profile": "chromium", "keep": "vol1"}, 409, "Conflict", "names nothing to keep"),
    ({"image": "minimal", "command": ["true"], "backend": "firecracker"}, 409, "Conflict",
     "is not built for firecracker"),
    ({"image": "minimal", "command": ["true"], "start": "warm"}, 409, "Conflict", "cannot start warm: no template"),
])
def test_bad_input_is_a_problem_with_the_one_line_message(svc: Running, body: Any, status: int, title: str,
                                                          detail: str) -> None:
    with svc.raw_uds() as http:
        r = http.post("/v1/sessions", json=body)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["title"] == title and problem["status"] == status
    assert problem["type"].endswith("/" + title)
    assert detail in problem["detail"] and "\n" not in problem["detail"]
    assert "hint" in problem
    with pytest.raises((InvalidInput, NotFound, Conflict)) as err:  # the client raises the same class and words
        svc.uds.create_session(body)
    assert type(err.value).__name__ == title and detail in err.value.message
    assert err.value.hint == problem["hint"]
    assert svc.uds.sessions() == []  # nothing was started


def test_query_flags_take_exactly_the_documented_values(svc: Running) -> None:
    sid = svc.uds.create_session(SLEEP)["id"]
    wait_state(svc.uds, sid, "running")
    with svc.raw_uds() as http:
        for query in ("all=yes", "all=", "all=TRUE", "all=1&all=1", "all=null"):
            r = http.get(f"/v1/sessions?{query}")
            assert r.status_code == 400, query
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "is not a flag value" in r.json()["detail"] and "1, true, 0, false" in r.json()["hint"]
        r = http.delete(f"/v1/sessions/{sid}?wait=maybe")
        assert r.status_code == 400 and "?wait=maybe" in r.json()["detail"]
        assert svc.uds.session(sid)["state"] == "running"  # a bad flag stopped nothing
        assert [s["id"] for s in http.get("/v1/sessions?all=false").json()["sessions"]] == [sid]
        assert http.get("/v1/sessions?all=1").status_code == 200
        r = http.delete(f"/v1/sessions/{sid}?wait=true")
        assert r.status_code == 200 and r.json()["state"] == "ended"


def test_a_whole_number_written_with_a_point_is_that_number(svc: Running) -> None:
    """JSON has one number type, and the document's "integer" (JSON Schema) takes 256.0: so does dispod."""
    with svc.raw_uds() as http:
        r = http.post("/v1/sessions", json={**SLEEP, "memory_mib": 256.0, "vcpus": 1.0})
        assert r.status_code == 201, r.text
        svc.uds.delete(r.json()["id"], wait=True)
        r = http.post("/v1/sessions", json={**SLEEP, "memory_mib": 256.5})
        assert r.status_code == 400 and "memory_mib 256.5 is not an integer" in r.json()["detail"]
        r = http.put("/v1/pool/chromium", json={"count": 1.0})  # a good count; there is no template to fill from
        assert r.status_code == 404 and "no template" in r.json()["detail"]
        for bad in (1.5, True, "1", None):
            r = http.put("/v1/pool/chromium", json={"count": bad})
            assert r.status_code == 400 and "whole number" in r.json()["detail"], bad
    assert svc.uds.sessions() == []


def test_bodies_that_are_not_json_or_too_large(svc: Running) -> None:
    with svc.raw_uds() as http:
        r = http.post("/v1/sessions", content=b"{nope", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
        r = http.post("/v1/sessions", content=b"image=minimal", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["title"] == "InvalidInput"
        big = {"image": "minimal", "command": ["echo", "x" * (100 * 1024)]}
        r = http.post("/v1/sessions", json=big)
        assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json")
        assert http.get("/v1/sessions/nothex00").status_code == 400
        r = http.get("/v1/sessions/0badcafe")
        assert r.status_code == 404 and r.json()["title"] == "NotFound"
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["title"] == "NotFound"
    assert svc.uds.sessions() == []


def test_events_stream_state_changes_in_order(svc: Running) -> None:
    seen: queue.Queue[Event] = queue.Queue()
    listening = threading.Event()

    def listen() -> None:
        with DispodClient(uds=svc.dispod.paths.socket) as c:
            for event in c.events():
                listening.set()
                seen.put(event)
                if event.kind is EventKind.STATE and event.fields["state"] == "ended":
                    return

    # The global stream starts with a snapshot of the live sessions: one is running already.
    warm = svc.uds.create_session(SLEEP)["id"]
    wait_state(svc.uds, warm, "running")
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(SAFETY_S)
    sid = svc.uds.create_session(SLEEP)["id"]
    wait_state(svc.uds, sid, "running")
    svc.uds.delete(sid)
    thread.join(SAFETY_S)
    events = list(seen.queue)
    assert events[0].kind is EventKind.STATE and events[0].session_id == warm
    states = [e.fields["state"] for e in events if e.kind is EventKind.STATE and e.session_id == sid]
    assert states == ["starting", "running", "stopping", "ended"]
    kinds = [e.kind for e in events if e.session_id == sid]
    assert kinds.index(EventKind.READY) < kinds.index(EventKind.ENDED) < len(kinds) - 1  # ended, then state ended
    svc.uds.delete(warm, wait=True)


def test_event_stream_of_a_session_that_already_ended(svc: Running) -> None:
    sid = svc.uds.create_session({"image": "minimal", "command": ["sh", "-c", "exit 3"]})["id"]
    until_ended(svc.uds, sid)
    late = list(svc.uds.events(session=sid))
    assert [e.kind for e in late] == [EventKind.ENDED]
    assert late[0].fields["exit_status"] == 3
    with svc.raw_uds() as http:  # the raw stream: ended, then the final state, then it closes
        body = http.get("/v1/events", params={"session": sid}).text
    frames = [f for f in body.split("\n\n") if f.strip()]
    assert [f.splitlines()[0] for f in frames] == ["event: ended", "event: state"]
    assert json.loads(frames[1].splitlines()[1].removeprefix("data: "))["fields"]["state"] == "ended"
    with pytest.raises(NotFound):
        list(svc.uds.events(session="0badcafe"))


def test_idle_timeout_ends_an_idle_session_and_says_so(svc: Running, cfg: Config) -> None:
    before = leftovers(cfg)
    sid = svc.uds.create_session({**SLEEP, "idle_timeout_s": 1})["id"]
    events = until_ended(svc.uds, sid)
    reason = events[-1].fields["end_reason"]
    assert "idle" in reason
    assert svc.uds.session(sid)["end_reason"] == reason and svc.uds.session(sid)["end_kind"] == "idle"
    assert leftovers(cfg) == before


def test_a_session_that_dispod_ended_at_its_stop_says_so_for_programs(cfg: Config) -> None:
    with serving(cfg) as svc:
        sid = svc.uds.create_session(SLEEP)["id"]
        wait_state(svc.uds, sid, "running")
    status = svc.dispod.rt.get(sid).status()
    assert status["end_reason"] == "dispod stopping" and status["end_kind"] == "dispod_stopped"


def test_max_lifetime_ends_a_session_and_says_so(svc: Running) -> None:
    # Output every 0.1 s keeps it in use, so only the lifetime can end it.
    cmd = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
    sid = svc.uds.create_session({"image": "minimal", "command": cmd, "idle_timeout_s": 30,
                                  "max_lifetime_s": 1})["id"]
    events = until_ended(svc.uds, sid)
    assert "maximum lifetime" in events[-1].fields["end_reason"] and events[-1].fields["end_kind"] == "lifetime"
    assert output(events).startswith(b"tick\n")


def test_profiles_images_and_health_through_the_client(svc: Running) -> None:
    profiles = {p["name"]: p for p in svc.uds.profiles()}
    assert profiles["chromium"]["image"] == "minimal" and profiles["chromium"]["image_exists"] is True
    assert profiles["chromium"]["display"] == "web"
    assert profiles["firefox"]["image_exists"] is False  # built in; its image is not there
    images = svc.uds.images()
    assert [i["name"] for i in images] == ["minimal"] and images[0]["bootable"] is True
    health = svc.uds.health()
    assert health["status"] == "ok" and health["machinery"] == "fake" and health["max_sessions"] == 4


def test_client_available_only_when_dispod_answers(cfg: Config, tmp_path: Path) -> None:
    assert DispodClient.available(cfg) is None  # no socket
    sock_path = ServicePaths(cfg.state_dir).socket
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # a socket file nobody listens on: what a killed dispod leaves
    stale.close()
    assert sock_path.exists() and DispodClient.available(cfg) is None
    with serving(cfg) as svc:
        client = DispodClient.available(cfg)
        assert client is not None
        with client:
            assert client.sessions() == []
        assert stat_mode(sock_path) == 0o600
        for f in (svc.dispod.paths.token, svc.dispod.paths.url):
            assert stat_mode(f) == 0o600
        assert svc.dispod.paths.url.read_text().strip() == f"{svc.base}/ui/{svc.token}/"
        assert any(line.startswith("dashboard: http://127.0.0.1:") for line in svc.lines)
    assert not sock_path.exists() and not svc.dispod.paths.url.exists()
    assert stat_mode(svc.dispod.paths.token) == 0o600  # kept for the next dispod
    with pytest.raises(ServiceError):  # dispod gone: the client says so with ServiceError
        DispodClient(uds=sock_path).sessions()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _answers(svc: Running, token: str) -> int:
    with httpx.Client(base_url=svc.base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        return http.get("/v1/sessions").status_code


def test_the_token_is_kept_across_restarts_until_rotated(cfg: Config) -> None:
    """A restarted dispod keeps dispod.token (so an open dashboard reconnects by itself); --new-token makes a new
    one and the old one gets 401."""
    with serving(cfg) as svc:
        first = svc.token
        assert ServicePaths(cfg.state_dir).token.read_text().strip() == first
    with serving(cfg) as svc:
        assert svc.token == first and _answers(svc, first) == 200
        assert svc.dispod.paths.url.read_text().strip().endswith(f"/ui/{first}/")
    with serving(cfg, new_token=True) as svc:
        assert svc.token != first and _answers(svc, svc.token) == 200
        assert _answers(svc, first) == 401
        assert ServicePaths(cfg.state_dir).token.read_text().strip() == svc.token
        assert stat_mode(svc.dispod.paths.token) == 0o600
        assert any("new access token" in line for line in svc.lines)


@pytest.mark.parametrize("plant", ["symlink", "mode 0644", "not a token", "a directory"])
def test_an_untrustworthy_token_file_is_replaced_not_used(cfg: Config, tmp_path: Path, plant: str) -> None:
    """A token file dispod did not leave as it leaves one (a symlink, another mode, other content) is not used:
    dispod makes a new token in a fresh 0600 file, and never writes through a symlink."""
    planted = "p" * 43
    paths = ServicePaths(cfg.state_dir)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(planted + "\n")
    elsewhere.chmod(0o600)
    if plant == "symlink":
        paths.token.symlink_to(elsewhere)
    elif plant == "a directory":
        paths.token.mkdir()
    else:
        paths.token.write_text(planted + "\n" if plant == "mode 0644" else "<script>\n")
        paths.token.chmod(0o644 if plant == "mode 0644" else 0o600)
    if plant == "a directory":  # not removable by unlink: dispod says so and does not start
        with pytest.raises(PermissionProblem, match="cannot write the token file"), serving(cfg):
            pass
        return
    with serving(cfg) as svc:
        assert svc.token != planted and _answers(svc, svc.token) == 200 and _answers(svc, planted) == 401
        assert not paths.token.is_symlink() and stat_mode(paths.token) == 0o600
        assert paths.token.read_text().strip() == svc.token
        assert any(line.startswith(f"warning: not using {paths.token}") for line in svc.lines), svc.lines
    assert elsewhere.read_text() == planted + "\n"  # the symlink's target was not written


# -- the guards -----------------------------------------------------------------------------------------
def test_tcp_needs_the_token_and_the_unix_socket_does_not(svc: Running) -> None:
    with svc.tcp(auth=False) as http:
        r = http.get("/v1/health")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["title"] == "PermissionProblem"
        assert http.post("/v1/sessions", json=SLEEP).status_code == 401
        assert http.get("/v1/health", headers={"Authorization": "Bearer " + svc.token[:-1] + "x"}).status_code == 401
        assert http.get("/v1/health", headers={"Authorization": "Basic " + svc.token}).status_code == 401
        # ?access_token= is for the event stream alone (EventSource cannot send headers)
        assert http.get("/v1/sessions", params={"access_token": svc.token}).status_code == 401
        with http.stream("GET", "/v1/events", params={"access_token": svc.token}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
    with svc.tcp() as http:
        assert http.get("/v1/health").status_code == 200
    with svc.raw_uds() as http:
        assert http.get("/v1/health").status_code == 200
    assert svc.uds.sessions() == []
    client = svc.tcp_client()
    with client:
        assert client.health()["status"] == "ok"


def test_every_answer_carries_the_security_headers(svc: Running) -> None:
    with svc.tcp() as http:
        for r in (http.get("/v1/health"), http.get("/v1/nothing"), http.get(f"/ui/{svc.token}/"),
                  http.get("/ui/wrong/"), http.post("/v1/sessions", json={"x": 1})):
            assert r.headers["Referrer-Policy"] == "no-referrer", r.url
            assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
            assert r.headers["Cache-Control"] == "no-store", r.url


def test_host_must_name_the_listener(svc: Running) -> None:
    port = svc.base.rsplit(":", 1)[1]
    with svc.tcp() as http:
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
            assert http.get("/v1/health", headers={"Host": host}).status_code == 200
        for host in (f"evil.example:{port}", "127.0.0.1:1", "127.0.0.1"):  # DNS rebinding, another port
            r = http.get("/v1/health", headers={"Host": host})
            assert r.status_code == 403 and "Host" in r.json()["detail"], host
        r = http.get(f"/ui/{svc.token}/", headers={"Host": "evil.example"})
        assert r.status_code == 403


def test_a_foreign_origin_changes_nothing(svc: Running) -> None:
    with svc.tcp() as http:
        r = http.post("/v1/sessions", json=SLEEP, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
        assert http.post("/v1/sessions", json=SLEEP, headers={"Origin": "null"}).status_code == 403
        assert svc.uds.sessions() == []
        r = http.post("/v1/sessions", json=SLEEP, headers={"Origin": svc.base})
        assert r.status_code == 201
        sid = r.json()["id"]
        wait_state(svc.uds, sid, "running")
        r = http.delete(f"/v1/sessions/{sid}", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert svc.uds.session(sid)["state"] == "running"
        # GET with a foreign Origin reads (CORS keeps the answer from the other page) but changes nothing
        assert http.get(f"/v1/sessions/{sid}", headers={"Origin": "http://evil.example"}).status_code == 200
    with svc.raw_uds() as http:  # the unix socket checks Origin too
        assert http.post("/v1/sessions", json=SLEEP, headers={"Origin": "http://evil.example"}).status_code == 403
    svc.uds.delete(sid, wait=True)


def test_no_state_change_on_get(svc: Running) -> None:
    created = svc.uds.create_session({"profile": "chromium"})
    sid, viewer = created["id"], created["viewer_url"]
    wait_state(svc.uds, sid, "running")
    with svc.tcp() as http:
        assert http.get(f"/v1/sessions/{sid}/stop").status_code == 404
        assert http.get(f"/v1/sessions/{sid}/delete").status_code == 404
        r = http.post(f"/v1/sessions/{sid}", json={})
        assert r.status_code == 405 and r.json()["title"] == "InvalidInput" and "DELETE" in r.headers["Allow"]
        assert http.put("/v1/sessions", json=SLEEP).status_code == 405
        r = http.get(viewer + "stop")
        assert r.status_code == 405
    assert svc.uds.session(sid)["state"] == "running"
    assert svc.uds.delete(sid, wait=True)["state"] == "ended"


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _half_header(base: str) -> socket.socket:
    host, port = _address(base)
    s = socket.create_connection((host, port), timeout=SAFETY_S)
    s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode())
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):  # returns b"" once the server closed the connection
        data += chunk
    return data


def _authenticated(base: str, token: str) -> socket.socket:
    """A kept-alive connection that has shown the token (one answered request)."""
    host, port = _address(base)
    s = socket.create_connection((host, port), timeout=SAFETY_S)
    s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    return s


def test_connections_past_the_cap_are_answered_503(cfg: Config) -> None:
    with serving(cfg, limits=Limits(max_connections=3, header_timeout_s=SAFETY_S)) as svc:
        held = [_authenticated(svc.base, svc.token) for _ in range(3)]
        try:
            with _half_header(svc.base) as over:
                assert _read_all(over).startswith(b"HTTP/1.1 503 ")
            with svc.raw_uds() as http:  # the unix socket has its own cap: root is never locked out
                assert http.get("/v1/health").status_code == 200
        finally:
            for s in held:
                s.close()
        assert svc.dispod.server is not None
        tcp = svc.dispod.server.listeners[ListenerKind.TCP]
        assert tcp.refused == 1
        deadline = time.monotonic() + SAFETY_S
        while tcp.open:  # the server saw the three close
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with svc.tcp() as http:  # room again
            assert http.get("/v1/health").status_code == 200


def test_a_slow_request_head_is_answered_408_and_closed(cfg: Config) -> None:
    with serving(cfg, limits=Limits(header_timeout_s=1)) as svc:
        slow = [_half_header(svc.base) for _ in range(3)]
        try:
            for s in slow:  # each is answered 408 and closed once the header timeout passed
                answer = _read_all(s)
                assert answer.startswith(b"HTTP/1.1 408 "), answer
        finally:
            for s in slow:
                s.close()
        with socket.create_connection(_address(svc.base), timeout=SAFETY_S) as idle:
            assert _read_all(idle) == b""  # sent nothing: closed without an answer
        assert svc.dispod.server is not None
        assert svc.dispod.server.listeners[ListenerKind.TCP].timed_out == 4
        with svc.tcp() as http:  # a prompt client is served as usual, event streams stay open past the timeout
            assert http.get("/v1/health").status_code == 200
            with http.stream("GET", "/v1/events") as stream:
                # A session that outlives the header timeout: its stream must stay open until its end.
                sid = svc.uds.create_session({"image": "minimal", "command": ["sh", "-c", "sleep 2; exit 4"]})["id"]
                ended = None
                for line in stream.iter_lines():
                    event = json.loads(line.removeprefix("data: ")) if line.startswith("data: ") else {}
                    if event.get("kind") == "ended" and event["session_id"] == sid:
                        ended = event
                        break
                assert ended is not None and ended["fields"]["exit_status"] == 4


# -- viewers ---------------------------------------------------------------------------------------------
async def _greeting(url: str, origin: str, live: Any = None) -> bytes:
    """The first message through the viewer's bridge; with `live`, then one browser message, which must count
    as use of the session."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("binary",),
                                                                headers={"Origin": origin}) as ws:
        msg = await ws.receive(timeout=SAFETY_S)
        assert msg.type is aiohttp.WSMsgType.BINARY, msg
        if live is not None:
            used = live.last_activity
            await ws.send_bytes(b"RFB 003.008\n")
            deadline = time.monotonic() + SAFETY_S
            while live.last_activity == used:
                assert time.monotonic() < deadline, "a browser message did not count as use"
                await asyncio.sleep(0.01)
        return bytes(msg.data)


async def _ws_status(url: str, origin: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, headers={"Origin": origin}):
                return 101
        except aiohttp.WSServerHandshakeError as e:
            return e.status


@pytest.mark.skipif(not Path("/usr/share/novnc/vnc.html").exists(), reason="needs Debian package novnc")
def test_viewer_route_token_bridge_and_end_session(cfg: Config) -> None:
    # A guest that is ready after 2 s: the viewer is opened while the session still starts.
    with serving(cfg, machinery=fakes.machinery(ready_delay=2.0)) as svc:
        created = svc.uds.create_session({"profile": "chromium"})
        sid, url = created["id"], created["viewer_url"]
        assert url.startswith(f"{svc.base}/viewer/{sid}/") and url.endswith("/")
        token = url.rstrip("/").rsplit("/", 1)[1]
        assert len(token) >= 32 and token != svc.token
        ws = url.replace("http://", "ws://") + "websockify"
        with svc.tcp(auth=False) as http:  # the page's words while the session starts (viewer.js polls them)
            early = http.get(url + "status").json()
            assert early["state"] == "starting" and not early["display"] and not early["done"], early
            assert early["text"].endswith("…") and early["error"] is None
        # Opened while the session starts: the bridge waits for the display, then greets; browser input
        # counts as use (the idle timer starts again).
        hello = asyncio.run(_greeting(ws, svc.base, svc.dispod.rt.get(sid)))
        assert hello.startswith(b"RFB 003.008")
        assert svc.uds.session(sid)["state"] == "running"
        with svc.tcp(auth=False) as http:  # the viewer's token is in its path: no bearer needed
            page = http.get(url)
            assert page.status_code == 200 and "End session" in page.text
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
            assert f"path=viewer/{sid}/{token}/websockify" in page.text
            assert http.get(url + "vnc.html").status_code == 200
            assert http.get(url + "dispo-viewer.js").status_code == 200
            wrong = url.replace(token, token[:-2] + "xx")
            assert http.get(wrong).status_code == 403
            assert http.get(wrong + "vnc.html").status_code == 403
            assert http.get(url.replace(sid, "0badcafe")).status_code == 403
            assert asyncio.run(_ws_status(wrong + "websockify", svc.base)) == 403
            assert asyncio.run(_ws_status(ws, "http://evil.example")) == 403
            assert http.post(url + "stop", headers={"Origin": "http://evil.example"}).status_code == 403
            assert svc.uds.session(sid)["state"] == "running"
            assert http.post(url + "stop", headers={"Origin": svc.base}).status_code == 200  # "End session"
        ended = wait_state(svc.uds, sid, "ended")
        assert ended["end_reason"] == "ended from the viewer" and ended["end_kind"] == "viewer"
        with svc.tcp(auth=False) as http:
            assert http.get(url).status_code == 403  # the session and its viewer are gone
            # ... but a page that was open still learns how the session ended
            final = http.get(url + "status").json()
            assert final["done"] and final["text"] == "The session ended: ended from the viewer.", final
            assert http.get(url.replace(token, token[:-2] + "xx") + "status").status_code == 403


def test_without_tcp_urls_name_the_unix_socket(cfg: Config) -> None:
    """No TCP listener: no browser can reach dispod, and the URLs say where it is (the http+unix form)."""
    with serving(cfg, listen="") as svc:
        assert svc.dispod.server is not None and svc.dispod.server.base_url == ""
        quoted = urllib.parse.quote(str(svc.dispod.paths.socket), safe="")
        created = svc.uds.create_session({"profile": "chromium"})
        assert created["viewer_url"].startswith(f"http+unix://{quoted}/viewer/{created['id']}/")
        assert svc.dispod.paths.url.read_text().startswith(f"http+unix://{quoted}/ui/")
        assert any("need TCP" in line for line in svc.lines)
        svc.uds.delete(created["id"], wait=True)


# -- the dashboard -------------------------------------------------------------------------------------
def test_dashboard_page(svc: Running) -> None:
    with svc.tcp(auth=False) as http:
        r = http.get(f"/ui/{svc.token}/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert ">Start chromium</button>" in r.text and ">Start firefox</button>" in r.text
        assert 'aria-live="polite"' in r.text
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["Referrer-Policy"] == "no-referrer"
        js = http.get(f"/ui/{svc.token}/dashboard.js")
        assert js.status_code == 200 and "End session" in js.text and "No sessions" in js.text
        assert http.get(f"/ui/{svc.token}", follow_redirects=False).status_code == 308
        assert http.get("/ui/not-the-token/").status_code == 403
        assert http.get(f"/ui/{svc.token[:-1]}/dashboard.js").status_code == 403
    with svc.raw_uds() as http:
        assert ">Start chromium</button>" in http.get(f"/ui/{svc.token}/").text


# -- dispod as a process ---------------------------------------------------------------------------------


def test_kill_9_then_the_next_dispod_reclaims_and_nothing_is_left(cfg: Config, tmp_path: Path) -> None:
    before = leftovers(cfg)
    log = tmp_path / "dispod.log"
    first = spawn_dispod(tmp_path, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        with dispod_ready(cfg, first, log) as client:
            sid = client.create_session(SLEEP)["id"]
            wait_state(client, sid, "running")
        vmm = fakes.fake_vmm_pids(sid)
        assert vmm
        first.kill()  # SIGKILL: no teardown at all
        first.wait(SAFETY_S)
        deadline = time.monotonic() + SAFETY_S
        while fakes.fake_vmm_pids(sid):  # the VMM dies with its owner (parent-death signal)
            assert time.monotonic() < deadline, fakes.fake_vmm_pids(sid)
            time.sleep(0.05)
        assert (cfg.state_dir / "sessions" / sid).is_dir()  # the rest waits for the next dispod
        second = spawn_dispod(tmp_path, log)
        with dispod_ready(cfg, second, log) as client:
            assert f"reclaimed session {sid}" in log.read_text()
            assert fakes.fake_vmm_pids(sid) == []
            assert not (cfg.state_dir / "sessions" / sid).exists() and not (cfg.disks_dir / sid).exists()
            status = client.session(sid)
            assert status["state"] == "ended"
            assert status["end_reason"] == "reclaimed: its owner (a previous dispod) died"
            assert status["end_kind"] == "reclaimed"
            proof = receipt.find(cfg, sid)  # the crash path's disposal receipt
            assert proof is not None and proof["clean"] and proof["end_reason"] == status["end_reason"], proof
            assert proof["image_unchanged"] is True and proof["objects"], proof
            assert client.sessions() == []
            other = client.create_session(SLEEP)["id"]
            wait_state(client, other, "running")
        second.send_signal(signal.SIGTERM)
        assert second.wait(SAFETY_S) == 0, log.read_text()
        assert f"session {other} ended: dispod stopping" in log.read_text()
        assert leftovers(cfg) == before
        paths = ServicePaths(cfg.state_dir)
        assert not paths.socket.exists() and not paths.url.exists()
    finally:
        end_dispod(first)
        if second is not None:
            end_dispod(second)


def test_a_second_dispod_on_the_same_state_dir_refuses(cfg: Config, tmp_path: Path) -> None:
    log = tmp_path / "dispod.log"
    first = spawn_dispod(tmp_path, log)
    try:
        with dispod_ready(cfg, first, log) as client:
            second = subprocess.run([sys.executable, "-m", "dispo.daemon.main", "--machinery",
                                     "tests.fakes:machinery"], env=fakes.env(tmp_path), capture_output=True,
                                    text=True, timeout=SAFETY_S, cwd=fakes.REPO, stdin=subprocess.DEVNULL)
            assert second.returncode == 1
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert lines[0].startswith(f"dispod: error: another dispod (pid {first.pid}) already serves")
            assert "(hint: " in lines[0]
            assert client.health()["status"] == "ok"  # the first one is untouched
        first.send_signal(signal.SIGINT)
        assert first.wait(SAFETY_S) == 0
    finally:
        end_dispod(first)


def test_dispod_says_one_session_not_one_sessions(cfg: Config, tmp_path: Path) -> None:
    log = tmp_path / "dispod.log"
    proc = spawn_dispod(tmp_path, log, "--max-sessions", "1")
    try:
        with dispod_ready(cfg, proc, log):
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SAFETY_S) == 0, log.read_text()
        assert "(max 1 session, machinery" in log.read_text(), log.read_text()
    finally:
        end_dispod(proc)


def test_dispod_refuses_bad_options_in_one_line(cfg: Config, tmp_path: Path) -> None:
    for argv, words in ((["--listen", "0.0.0.0:8686"], "every address"), (["--listen", "nope"], "HOST:PORT"),
                        (["--max-sessions", "0"], "max_sessions is 0"),
                        (["--machinery", "tests.fakes:nothing"], "--machinery")):
        r = subprocess.run([sys.executable, "-m", "dispo.daemon.main", *argv], env=fakes.env(tmp_path),
                           capture_output=True, text=True, timeout=SAFETY_S, cwd=fakes.REPO, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, (argv, r.stderr)
        assert r.stderr.startswith("dispod: error: ") and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not ServicePaths(cfg.state_dir).socket.exists()


def test_help_hides_the_test_machinery_option() -> None:
    r = subprocess.run([sys.executable, "-m", "dispo.daemon.main", "--help"], capture_output=True, text=True,
                       timeout=SAFETY_S, stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert r.returncode == 0 and "--listen" in r.stdout and "--machinery" not in r.stdout


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian package chromium (and playwright)")
def test_dashboard_in_a_browser_starts_lists_and_ends_a_session(cfg: Config) -> None:
    """The dashboard's script in a real browser (Playwright + Debian's chromium), against fake sessions."""
    from playwright.sync_api import expect, sync_playwright

    with serving(cfg) as svc, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{svc.base}/ui/{svc.token}/")
            expect(page.get_by_text("No sessions.")).to_be_visible()
            page.get_by_label("URL to open (optional)").first.fill("https://example.org/")
            page.get_by_role("button", name="Start chromium").click()
            row = page.locator("#rows tr")
            expect(row).to_have_count(1)
            expect(row.locator(".state")).to_have_text("Running", timeout=SAFETY_S * 1000)
            listed = svc.uds.sessions()
            assert [s["profile"] for s in listed] == ["chromium"]
            sid = listed[0]["id"]
            assert svc.dispod.rt.get(sid).request.url == "https://example.org/"
            expect(row.get_by_role("link", name="Open viewer")).to_have_attribute("href", listed[0]["viewer_url"])
            row.get_by_role("button", name="End session").click()
            expect(page.get_by_text("No sessions.")).to_be_visible(timeout=SAFETY_S * 1000)
            expect(page.get_by_role("status")).to_contain_text(f"Session {sid}: Ended by you.")
            assert svc.uds.session(sid)["end_reason"] == "stopped through the API (DELETE)"
            assert problems == []  # no script error, no CSP violation
        finally:
            browser.close()
