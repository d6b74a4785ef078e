"""dispod's HTTP edge, spoken to byte by byte (raw sockets, fake machinery): connections without a token cannot
lock out those with one, requests aiohttp's parser refuses get dispod's own answers, repeated Host or Origin
headers and foreign absolute-form targets are refused, hostile bodies and header bytes get 4xx, not 500.
"""

from __future__ import annotations

import json
import socket

import pytest

from dispo.config import Config
from dispo.web.guard import Limits, ListenerKind
from tests.fakeworld import SAFETY_S, SLEEP, Running, cfg, serving, svc

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

SECRET = b"ECHO-ME-NOT"  # put in each bad request: no answer may repeat it


def _address(svc: Running) -> tuple[str, int]:
    host, port = svc.base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _exchange(svc: Running, raw: bytes) -> bytes:
    """Send `raw` on a new TCP connection; everything dispod answers until it closes."""
    with socket.create_connection(_address(svc), timeout=SAFETY_S) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


class Answer:
    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def problem(self) -> dict[str, object]:
        assert self.headers["content-type"].startswith("application/problem+json"), self.headers
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def _request(svc: Running, head: str, body: bytes = b"", *, token: bool = True) -> Answer:
    host, port = _address(svc)
    auth = f"Authorization: Bearer {svc.token}\r\n" if token else ""
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    raw = f"{head}\r\nHost: {host}:{port}\r\n{auth}{length}Connection: close\r\n\r\n".encode() + body
    return Answer(_exchange(svc, raw))


# -- connections ---------------------------------------------------------------------------------------
def test_slow_clients_without_a_token_do_not_lock_out_those_with_one(cfg: Config) -> None:
    with serving(cfg, limits=Limits(max_connections=64, header_timeout_s=SAFETY_S)) as svc:
        host, port = _address(svc)
        slow = []
        try:
            for _ in range(80):  # more than the whole cap, each holding half a request head
                s = socket.create_connection((host, port), timeout=SAFETY_S)
                s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode())
                slow.append(s)
            statuses = [_request(svc, "GET /v1/health HTTP/1.1").status for _ in range(40)]
            assert statuses == [200] * 40
            assert svc.uds.health()["status"] == "ok"  # the unix socket has its own rules
            assert svc.dispod.server is not None
            tcp = svc.dispod.server.listeners[ListenerKind.TCP]
            assert len(tcp.waiting) <= Limits().max_waiting_per_peer  # all from 127.0.0.1: one peer
        finally:
            for s in slow:
                s.close()


# -- what aiohttp's parser refuses -----------------------------------------------------------------------
def _bad_requests(host: str) -> dict[str, bytes]:
    ok = f"Host: {host}\r\n".encode()
    return {
        "long header": b"GET /v1/health HTTP/1.1\r\n" + ok + b"X-Long: " + SECRET + b"A" * 9000 + b"\r\n\r\n",
        "long URL": b"GET /" + SECRET + b"a" * 9000 + b" HTTP/1.1\r\n" + ok + b"\r\n",
        "bad method": b"G" + SECRET + b"T / HTTP/1.1\r\n" + ok + b"\r\n",
        "NUL in a header": b"GET /v1/health HTTP/1.1\r\n" + ok + b"X-Nul: " + SECRET + b"\x00x\r\n\r\n",
        "too many headers": b"GET /v1/health HTTP/1.1\r\n" + ok
                            + b"".join(b"X-%d: %s\r\n" % (i, SECRET) for i in range(200)) + b"\r\n",
        "CL with TE": b"POST /v1/sessions HTTP/1.1\r\n" + ok + b"Content-Length: 5\r\n"
                      b"Transfer-Encoding: chunked\r\nX-Echo: " + SECRET + b"\r\n\r\n0\r\n\r\n",
        "empty Host": b"GET /v1/health HTTP/1.1\r\nHost: \r\nConnection: close\r\nX-Echo: " + SECRET + b"\r\n\r\n",
        "TLS": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET + b"\x00" * 64,
    }


def test_requests_the_parser_refuses_get_dispods_own_answer(svc: Running) -> None:
    host, port = _address(svc)
    for what, raw in _bad_requests(f"{host}:{port}").items():
        data = _exchange(svc, raw)
        answer = Answer(data)
        assert 400 <= answer.status < 500, (what, data[:300])
        assert answer.headers.get("server") == "dispod", (what, answer.headers)
        assert answer.headers.get("x-content-type-options") == "nosniff", (what, answer.headers)
        assert answer.headers.get("cache-control") == "no-store", (what, answer.headers)
        assert SECRET not in data, (what, data[:300])
        text = answer.body.decode()
        if answer.headers["content-type"].startswith("application/problem+json"):  # got as far as the API
            assert answer.problem()["status"] == answer.status, (what, text)
        else:
            assert text.startswith("dispod: ") and text.count("\n") == 1, (what, text)


# -- Host, Origin, the target --------------------------------------------------------------------------
def test_two_host_or_two_origin_headers_are_refused(svc: Running) -> None:
    host, port = _address(svc)
    own = f"{host}:{port}"
    body = json.dumps(SLEEP).encode()
    for extra in (f"Host: {own}\r\n", f"Host: evil.example:{port}\r\n",
                  f"Origin: http://{own}\r\nOrigin: http://evil.example\r\n"):
        raw = (f"POST /v1/sessions HTTP/1.1\r\nHost: {own}\r\n{extra}Authorization: Bearer {svc.token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        answer = Answer(_exchange(svc, raw.encode() + body))
        name = extra.split(":")[0]
        assert answer.status == 400 and name.encode() in answer.body, (extra, answer.body)
    assert svc.uds.sessions() == []


def test_an_absolute_form_target_must_name_this_service(svc: Running) -> None:
    host, port = _address(svc)
    answer = _request(svc, "GET http://evil.example/v1/health HTTP/1.1")
    assert answer.status == 403 and "evil.example" in str(answer.problem()["detail"])
    assert _request(svc, f"GET http://{host}:{port}/v1/health HTTP/1.1").status == 200


# -- hostile bodies and header bytes -----------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[" * 30000 + b"]" * 30000, b'{"image": ' + b"[" * 40 + b"]" * 40 + b"}"])
def test_deeply_nested_json_is_400(svc: Running, body: bytes) -> None:
    for head in ("POST /v1/sessions HTTP/1.1", "PUT /v1/pool/chromium HTTP/1.1"):
        answer = _request(svc, head + "\r\nContent-Type: application/json", body)
        assert answer.status == 400, (head, answer.body[:300])
        problem = answer.problem()
        assert problem["title"] == "InvalidInput" and "deeper than" in str(problem["detail"])
    assert svc.uds.sessions() == []


def test_a_bearer_token_that_is_not_ascii_is_401(svc: Running) -> None:
    host, port = _address(svc)
    raw = f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n".encode()
    answer = Answer(_exchange(svc, raw + b"Authorization: Bearer \xff\xfe\r\n\r\n"))
    assert answer.status == 401 and answer.problem()["title"] == "PermissionProblem"
    answer = _request(svc, "GET /v1/events?access_token=%ff%fe HTTP/1.1", token=False)
    assert answer.status == 401


# -- wrong links -----------------------------------------------------------------------------------------
def test_a_wrong_dashboard_or_viewer_link_says_so_and_what_to_do(svc: Running) -> None:
    for path, words, hint in ((f"/ui/{svc.token[:-2]}xx/", "dashboard link", "dispod.url"),
                              ("/viewer/0badcafe/not-its-token/", "viewer link", "viewer_url")):
        answer = _request(svc, f"GET {path} HTTP/1.1", token=False)
        text = answer.body.decode()
        assert answer.status == 403, text
        assert text.startswith(f"dispod: this {words}") and text.count("dispod:") == 1, text
        assert hint in text and "run dispo as root" not in text and text.count("\n") == 1, text
