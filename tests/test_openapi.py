"""The hand-written OpenAPI document (web/openapi.py) against the real app: the same routes, examples that
validate against their schemas, and real answers of a running dispod (fake machinery) that validate too."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from dispo.config import Config
from dispo.runtime import Runtime, guestio
from dispo.runtime.request import API_KEYS
from dispo.web.api import FLAG_VALUES
from dispo.web.app import build_app
from dispo.web.guard import Limits
from dispo.web.openapi import document
from dispo.web.service import RECLAIMED_BY_DISPOD, Service, reclaimed_status
from dispo.web.viewers import ServiceViewers
from tests import fakes
from tests.fakeworld import SLEEP, Running, cfg, svc, until_ended, wait_state

__all__ = ["cfg", "svc"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

DOC_URI = "urn:dispod:openapi"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document()


def validator(doc: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A validator for the schema at `pointer` in the document, its #/components refs resolved in the document."""
    registry: Registry[Any] = Registry().with_resource(DOC_URI, Resource.from_contents(
        doc, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{DOC_URI}#{pointer}"}, registry=registry)


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def schema_pointer(name: str) -> str:
    return f"/components/schemas/{name}"


def test_the_document_lists_exactly_the_apps_routes(cfg: Config, doc: dict[str, Any]) -> None:
    rt = Runtime(cfg, machinery=fakes.machinery())
    app = build_app(Service(cfg, rt, token=secrets.token_urlsafe(8), viewers=ServiceViewers()), Limits())
    real = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
            if r.resource is not None and r.resource.canonical.startswith("/v1/")}
    documented = {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}
    assert documented == real
    assert len(real) == 22


def test_operations_are_complete(doc: dict[str, Any]) -> None:
    ids = []
    for path, item in doc["paths"].items():
        params = {p["name"] for p in item.get("parameters", [])}
        for method, op in ((m, o) for m, o in item.items() if m in METHODS):
            ids.append(op["operationId"])
            assert op["responses"] and op["summary"], (method, path)
            declared = params | {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert {seg[1:-1] for seg in path.split("/") if seg.startswith("{")} <= declared, path
            assert "401" in op["responses"], (method, path)  # every /v1 route needs the token on TCP
    assert len(ids) == len(set(ids))


def test_the_create_schema_knows_exactly_the_keys_the_runtime_takes(doc: dict[str, Any]) -> None:
    assert set(doc["components"]["schemas"]["SessionCreate"]["properties"]) == set(API_KEYS)


def _media_with_examples(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(pointer to a schema, example) for every example in the document."""
    for name, schema in doc["components"]["schemas"].items():
        for example in schema.get("examples", []):
            yield schema_pointer(name), example

    def walk(node: Any, pointer: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            if "schema" in node and ("example" in node or "examples" in node):
                if "example" in node:
                    yield f"{pointer}/schema", node["example"]
                for ex in (node.get("examples") or {}).values():
                    yield f"{pointer}/schema", ex["value"]
            for key, value in node.items():
                yield from walk(value, f"{pointer}/{escape(str(key))}")

    yield from walk(doc["paths"], "/paths")


def test_every_example_validates(doc: dict[str, Any]) -> None:
    checked = 0
    for pointer, example in _media_with_examples(doc):
        errors = list(validator(doc, pointer).iter_errors(example))
        assert not errors, (pointer, [e.message for e in errors])
        checked += 1
    assert checked >= 15


def test_the_schemas_refuse_what_they_should(doc: dict[str, Any]) -> None:
    create = validator(doc, schema_pointer("SessionCreate"))
    assert not create.is_valid({"profile": "chromium", "colour": "red"})
    assert not create.is_valid({"image": "minimal", "command": "echo hi"})
    session = validator(doc, schema_pointer("Session"))
    assert not session.is_valid({"id": "nope", "state": "running"})
    assert not session.is_valid({**doc["components"]["schemas"]["Session"]["examples"][0], "state": "paused"})
    listing = validator(doc, schema_pointer("SessionList"))  # through a $ref into the components
    assert not listing.is_valid({"sessions": [{"id": "1a2b3c4d"}]})


def test_the_document_says_what_dispod_refuses(doc: dict[str, Any]) -> None:
    """Each refusal of runtime/request.py and the handlers that does not depend on what exists is in the
    document, so a client (or a fuzzer) that follows it is not refused, and one that does not, is."""
    create = validator(doc, schema_pointer("SessionCreate"))
    for good in ({"profile": "chromium"}, {"profile": "chromium", "url": "about:blank", "display": "web",
                                           "keep": "vol1"},
                 {"image": "minimal", "command": ["true"], "display": "none", "memory_mib": 256.0}):
        assert create.is_valid(good), good
    for bad in ({"profile": "chromium", "command": ["true"]}, {"profile": "chromium", "command": []},
                {"image": "minimal"}, {"image": "minimal", "command": ["true"], "url": "https://example.org/"},
                {"image": "minimal", "command": ["true"], "display": "web"},
                {"image": "minimal", "command": ["true"], "keep": "vol1"}, {"image": "minimal", "command": ["a\0b"]},
                {"profile": "chromium", "url": "https://exa mple.org/"}, {"profile": None, "command": ["true"]},
                {"image": "", "command": ["true"]}, {"image": "minimal", "command": ["true"], "vcpus": 1.5}):
        assert not create.is_valid(bad), bad
    ops = doc["paths"]
    for path, method, name in (("/v1/sessions", "get", "all"), ("/v1/sessions/{id}", "delete", "wait")):
        (flag,) = [p for p in ops[path][method]["parameters"] if p["name"] == name]
        assert set(flag["schema"]["enum"]) == set(FLAG_VALUES)
        assert "400" in ops[path][method]["responses"]
    (upload,) = ops["/v1/sessions/{id}/uploads"]["post"]["parameters"]
    assert upload["schema"]["minLength"] == 1 and upload["schema"]["maxLength"] == guestio.MAX_NAME_BYTES
    pool = validator(doc, schema_pointer("PoolFill"))
    assert pool.is_valid({"count": 3}) and pool.is_valid({"count": 3.0}) and not pool.is_valid({"count": 3.5})


def test_the_event_stream_is_described_message_by_message(doc: dict[str, Any]) -> None:
    media = doc["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    assert doc["openapi"].startswith("3.2.") and set(media) == {"itemSchema"}
    message = validator(doc, schema_pointer("SseMessage"))
    assert message.is_valid({"event": "state", "data": "{}"})
    assert not message.is_valid({"event": "state"}) and not message.is_valid({"event": "nope", "data": "{}"})
    event = validator(doc, schema_pointer("Event"))
    output = {"kind": "output", "session_id": "1a2b3c4d", "message": "", "time": 1.0,
              "fields": {"stream": "stdout", "data": "aGkK"}}
    assert event.is_valid(output)
    assert not event.is_valid({**output, "fields": {"stream": "stdin", "data": "aGkK"}})
    assert not event.is_valid({**output, "kind": "ready"})  # a ready event has an address, backend, accel
    assert not event.is_valid({**output, "kind": "state"})  # a state event's fields are the session's status


def test_a_reclaimed_session_is_answered_as_a_session(doc: dict[str, Any]) -> None:
    meta = {"image": "minimal", "created": 1735689600.0, "owner": "dispod",
            "request": {"display": "none", "backend": "qemu", "idle_timeout_s": 0.0, "max_lifetime_s": 0.0}}
    status = reclaimed_status("1a2b3c4d", meta, RECLAIMED_BY_DISPOD)
    assert validator(doc, schema_pointer("Session")).is_valid(status)
    assert validator(doc, schema_pointer("Session")).is_valid(reclaimed_status("1a2b3c4d", {}, "reclaimed"))


def test_real_answers_validate(svc: Running, doc: dict[str, Any]) -> None:
    def check(name: str, data: Any) -> None:
        errors = list(validator(doc, schema_pointer(name)).iter_errors(data))
        assert not errors, (name, data, [e.message for e in errors])

    with svc.tcp() as http:
        assert http.get("/v1/openapi.json").json() == json.loads(json.dumps(doc))
        check("Health", http.get("/v1/health").json())
        check("ProfileList", http.get("/v1/profiles").json())
        check("ImageList", http.get("/v1/images").json())
        check("Problem", http.post("/v1/sessions", json={"colour": 1}).json())
        check("Problem", http.get("/v1/sessions/0badcafe").json())
        check("Problem", http.get("/v1/sessions", headers={"Authorization": "Bearer nope"}).json())
        created = http.post("/v1/sessions", json={"profile": "chromium"})
        assert created.status_code == 201
        check("Session", created.json())
        sid = created.json()["id"]
        wait_state(svc.uds, sid, "running")
        check("SessionList", http.get("/v1/sessions").json())
        check("Session", http.delete(f"/v1/sessions/{sid}", params={"wait": "1"}).json())
        done = svc.uds.create_session({"image": "minimal", "command": ["sh", "-c", "echo out; echo err >&2; exit 7"]})
        events = until_ended(svc.uds, done["id"])
        ended = http.get(f"/v1/sessions/{done['id']}").json()
        check("Session", ended)
        assert ended["exit_status"] == 7
        check("SessionList", http.get("/v1/sessions", params={"all": "1"}).json())
        raw = http.get("/v1/events", params={"session": done["id"]}).text
    for event in events:
        check("Event", event.to_json())
    frames = [f for f in raw.split("\n\n") if f.strip()]
    for frame in frames:
        kind, data = frame.splitlines()
        check("SseMessage", {"event": kind.removeprefix("event: "), "data": data.removeprefix("data: ")})
        check("Event", json.loads(data.removeprefix("data: ")))
        assert kind == "event: " + json.loads(data.removeprefix("data: "))["kind"]
    sleeping = svc.uds.create_session(SLEEP)
    check("Session", svc.uds.delete(sleeping["id"], wait=True))
