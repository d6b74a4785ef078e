"""The OpenAPI 3.2 document of dispod's REST API, written by hand and served at GET /v1/openapi.json.

tests/test_openapi.py checks that its (method, path) pairs are exactly the app's routes under /v1, that every
example validates against its schema, and that real answers of a running service validate too;
tests/test_fuzz_api.py runs schemathesis against it (it must say what dispod refuses, too).
"""

from __future__ import annotations

import copy
from typing import Any

from dispo import __version__
from dispo.runtime.events import EndKind, EventKind
from dispo.settings import SETTINGS, describe, limit_hi

JSON = "application/json"
PROBLEM = "application/problem+json"
SSE = "text/event-stream"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _problem(description: str, example: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": _ref("Problem")}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {PROBLEM: content}}


SESSION_ID = {"type": "string", "pattern": "^[0-9a-f]{8}$", "description": "8 hex digits"}
NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$"}
# A boolean query flag (web/api.py FLAG_VALUES): given once, exactly one of these; anything else is a 400.
FLAG = {"type": "string", "enum": ["1", "true", "0", "false"]}
# A file name in the guest (runtime/guestio.py check_guest_name): one path component, at most 255 bytes.
GUEST_FILE = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[^/\\x00]+$",
              "not": {"enum": [".", ".."]},
              "description": "one file name: no '/' or NUL, not '.' or '..', at most 255 bytes in UTF-8"}
# An upload's name (runtime/guestio.py upload): any text, made one harmless file name in the guest.
UPLOAD_NAME = {"type": "string", "minLength": 1, "maxLength": 255,
               "description": "the file's name, 1 to 255 characters (made safe: '/' and control characters become "
                              "'_'; at most 200 bytes are kept)"}


SCOPE = {"enum": ["view", "interact", "automate"],
         "description": "view: watch the viewer (no input, clipboard, files, sound or End session); interact: the "
                        "whole viewer (what viewer_url gives); automate: the automation endpoint alone (what cdp_url "
                        "or bidi_url gives; the viewer refuses it, as the automation endpoint refuses the others)"}
TOKEN_ID = {"type": "string", "pattern": "^[0-9a-f]{12}$", "description": "a token's public id (12 hex digits)"}
# DELETE's {token}: a token's id or the token itself (web/viewers.py revoke)
TOKEN_OR_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$",
               "description": "the token's id (as listed) or the token itself"}


def _setting(key: str) -> dict[str, Any]:
    """A session setting's schema, all of it from settings.py: type, default, limits, description."""
    s = SETTINGS[key]
    schema: dict[str, Any] = {"default": s.default, "description": describe(key, limits=False)}
    if s.choices:
        return {"enum": list(s.choices), **schema}
    if not s.number:
        return {**NAME, **schema}
    # JSON has one number type: 512.0 is the integer 512 (runtime/request.py reads it so).
    schema["type"] = "integer" if s.integer else "number"
    # limit_hi: memory_mib is also bounded by this host's memory, so this document says what this dispod takes.
    limits = {"minimum": s.lo, "maximum": limit_hi(key)}
    if s.zero and s.lo > 0:  # 0 has a meaning of its own, below the limits (shm_mib: the guest's default)
        return {**schema, "anyOf": [limits, {"const": 0, "description": s.zero}]}
    return {**schema, **limits}


SETTING_SCHEMAS = {key: _setting(key) for key in SETTINGS}
SETTING_SCHEMAS["image"]["description"] += "; GET /v1/images lists them"

SESSION_EXAMPLE: dict[str, Any] = {
    "id": "1a2b3c4d", "name": None, "profile": "chromium", "image": "chromium", "display": "web", "state": "running",
    "step": "", "created": 1735689600.0, "age_s": 12.5, "exit_status": None, "end_reason": None,
    "end_kind": None, "viewer_url": "http://127.0.0.1:8686/viewer/1a2b3c4d/Zk3v1E9nq0xW2gk3N1yQmU8rA1B2c3D4/",
    "address": "172.20.0.2", "backend": "qemu", "accel": "kvm", "error": None, "idle_timeout_s": 900.0,
    "max_lifetime_s": 0.0}
ENDED_EXAMPLE: dict[str, Any] = {
    **SESSION_EXAMPLE, "id": "5e6f7a8b", "profile": None, "image": "minimal", "display": "none", "state": "ended",
    "exit_status": 7, "end_reason": "the command exited with status 7", "end_kind": "exited", "viewer_url": None,
    "accel": "tcg",
    "idle_timeout_s": 0.0}
PROBLEM_EXAMPLE: dict[str, Any] = {
    "type": "https://dispo.dev/problems/InvalidInput", "title": "InvalidInput", "status": 400,
    "detail": "POST /v1/sessions: unknown key(s): colour",
    "hint": "known keys: profile, image, command, url, display, name, backend, start, log_requests, keep, "
            "automation, record, "
            "memory_mib, vcpus, shm_mib, ready_timeout_s, idle_timeout_s, max_lifetime_s"}
BUSY_EXAMPLE: dict[str, Any] = {
    "type": "https://dispo.dev/problems/Busy", "title": "Busy", "status": 429,
    "detail": "4 sessions are running, the most this service allows (max_sessions = 4)",
    "hint": "wait for a session to end, or raise max_sessions in the config"}

END_KIND: dict[str, Any] = {
    "enum": [k.value for k in EndKind],
    "description": "how it ended, for programs (null until it did): user (DELETE: the dashboard, dispo stop), viewer "
                   "(its End session), idle, lifetime, exited (its app or command; see exit_status), finished (a "
                   "template build), dispod_stopped, interrupted (its dispo run got SIGINT/SIGTERM), pool (a warm-pool "
                   "guest drained), failed (see error), reclaimed (its owner died)"}


def _fields(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


# What each kind of event carries in `fields` (the emitters: runtime/live.py, steps.py, pool.py, __init__.py).
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    EventKind.STEP.value: _fields(["step", "seconds"], {"step": {"type": "string"}, "seconds": {"type": "number"}}),
    EventKind.NOTICE.value: _fields([], {"start": {"enum": ["boot", "restore", "pool"]},
                                         "template": _nullable({"type": "string"})}),
    EventKind.READY.value: _fields(["address", "backend", "accel", "ready_s"], {
        "address": {"type": "string"}, "backend": {"type": "string"}, "accel": {"type": "string"},
        "ready_s": {"type": "number"}, "boot_s": {"type": "number"}, "start": {"const": "pool"}}),
    EventKind.VIEWER.value: _fields(["url"], {"url": {"type": "string"}}),
    EventKind.OUTPUT.value: _fields(["stream", "data"], {
        "stream": {"enum": ["stdout", "stderr"]},
        "data": {"type": "string", "contentEncoding": "base64", "description": "the bytes, base64"}}),
    EventKind.STATE.value: {"$ref": "#/components/schemas/Session",
                            "description": "the session's status, as GET /v1/sessions/{id} answers"},
    EventKind.ENDED.value: _fields(["exit_status", "end_reason", "end_kind", "error"], {
        "exit_status": _nullable({"type": "integer"}), "end_reason": {"type": "string"}, "end_kind": END_KIND,
        "error": _nullable({"$ref": "#/components/schemas/SessionError"}), "console_tail": {"type": "string"},
        "receipt": _nullable({"type": "object", "description": "the disposal receipt's summary (receipt.py)"}),
        "requests": _nullable({"type": "array", "items": {"$ref": "#/components/schemas/GuestRequest"}})}),
}

SCHEMAS: dict[str, Any] = {
    "SessionCreate": {
        "type": "object", "additionalProperties": False,
        "description": "A profile (and optionally a URL), or an image and a command. Everything else defaults "
                       "from the profile, then from dispo's settings.",
        "properties": {
            "profile": {**NAME, "description": "a profile name (GET /v1/profiles)"},
            "url": {"type": "string", "maxLength": 4096,
                    "pattern": "^(https?://[^\\s\\x00-\\x1f\\x7f]+|about:[a-z-]+)$",
                    "description": "with a profile: the page to open (http://, https:// or about:, no spaces)"},
            "command": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[^\\x00]*$"},
                        "description": "without a profile: the argv to run in the guest as `user` (no shell; "
                                       "no NUL; 64 KiB at most)"},
            "display": {"enum": ["web", "none"], "description": "x11 needs 'dispo run' in-process"},
            "name": {**NAME, "description": "a name for people"},
            **SETTING_SCHEMAS,
            "start": {"enum": ["auto", "cold", "warm"],
                      "description": "auto (default): a guest from the warm pool, else a restore from a current "
                                     "template that fits, else a boot; cold: always boot; warm: fail rather than "
                                     "boot"},
            "log_requests": {"type": "boolean",
                             "description": "record every connection and DNS query the guest makes (seen on the "
                                            "host side of its tap): the session's `requests`, its ended event and "
                                            "its disposal receipt list them (docs/quiet.md)"},
            "keep": {**NAME, "description": "keep the app's profile on this volume (made on first use, kept after "
                                            "the session; 'dispo volume ls|rm'); the profile must name a keep_path"},
            "record": {"type": "boolean",
                       "description": "record the app's web display to a video (WebM) kept in the workspace, with the "
                                      "request log beside it with log_requests; GET /v1/sessions/{id}/recording once "
                                      "the session ended; its sha256 goes into the disposal receipt; kept until "
                                      "'dispo recording rm' or [recordings] max_age_h"},
            "automation": {"type": "boolean",
                           "description": "with a browser profile on its web display: let programs drive the browser "
                                          "through the session's cdp_url (Chromium: Playwright's connect_over_cdp, "
                                          "Puppeteer's browserWSEndpoint) or bidi_url (Firefox: WebDriver BiDi). "
                                          "Restored only from an automation template ('dispo template build "
                                          "chromium --automation') or its pool, else a boot (docs/templates.md)"},
        },
        # What runtime/request.py build() refuses with a 400, said here: a profile brings its own command (and
        # is what a URL, a web display and a kept volume go with); without one, a command is needed.
        "if": {"required": ["profile"]},
        "then": {"not": {"required": ["command"]}},
        "else": {"required": ["command"], "properties": {"display": {"const": "none"}, "automation": {"const": False},
                                                         "record": {"const": False}},
                 "allOf": [{"not": {"required": ["url"]}}, {"not": {"required": ["keep"]}}]},
        "examples": [{"profile": "chromium", "url": "https://example.org/"},
                     {"image": "minimal", "command": ["sh", "-c", "echo hi; exit 7"], "idle_timeout_s": 60}],
    },
    "SessionError": {
        "type": "object", "required": ["type", "message", "hint", "status"],
        "description": "why a session failed: the error's class, one-line message and hint, and the fields of "
                       "that class (docs/api.md)",
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}, "hint": {"type": "string"},
                       "status": {"type": "integer"}, "console_tail": {"type": "string"}},
    },
    "Session": {
        "type": "object",
        "required": ["id", "state", "image", "display", "exit_status", "end_reason", "end_kind", "viewer_url",
                     "created"],
        "properties": {
            "id": SESSION_ID, "name": _nullable({"type": "string"}), "profile": _nullable({"type": "string"}),
            "image": {"type": "string"}, "display": {"enum": ["web", "x11", "none"]},
            "state": {"enum": ["starting", "running", "stopping", "ended"]},
            "step": {"type": "string", "description": "the bring-up step under way while starting"},
            "created": _nullable({"type": "number", "description": "seconds since the epoch"}),
            "age_s": _nullable({"type": "number"}),
            "exit_status": _nullable({"type": "integer", "description": "the command's or app's exit status"}),
            "end_reason": _nullable({"type": "string", "description": "why it ended or is ending"}),
            "end_kind": _nullable(END_KIND),
            "viewer_url": _nullable({"type": "string", "description": "web display: the viewer, from the start"}),
            "address": _nullable({"type": "string"}), "backend": {"type": "string"},
            "accel": _nullable({"type": "string"}), "error": _nullable(_ref("SessionError")),
            "idle_timeout_s": {"type": "number"}, "max_lifetime_s": {"type": "number"},
            "start": {"enum": ["boot", "restore", "pool"],
                      "description": "how its guest came: booted, restored from a template, or from the warm pool"},
            "pooled": {"type": "boolean", "description": "a guest still waiting in the warm pool"},
            "steps": {"type": "array", "items": {"type": "string"},
                      "description": "the names of its bring-up steps, in order (`step` is the one under way)"},
            "ended": _nullable({"type": "number", "description": "when it ended (seconds since the epoch)"}),
            "receipt": _nullable({"type": "object", "description": "once it ended: its disposal receipt's summary "
                                                                  "(clean, leftovers, checked, image_unchanged, ...)"}),
            "template": _nullable({"type": "string", "description": "the template it was restored from"}),
            "start_reason": _nullable({"type": "string", "description": "how its guest comes and why, one line"}),
            "requests": _nullable({"type": "array", "items": _ref("GuestRequest"),
                                   "description": "with log_requests: what the guest asked for so far"}),
            "features": _ref("Features"),
            "keep": _nullable({"type": "string", "description": "the volume it keeps (--keep)"}),
            "record": {"type": "boolean", "description": "its web display is recorded"},
            "recording": _nullable({"type": "object", "description": "once it ended: the recording it kept (path, "
                                                                     "bytes, sha256; GET .../recording)"}),
            "cdp_url": _nullable({"type": "string", "pattern": "^ws://",
                                  "description": "with automation (Chromium): the WebSocket a CDP client connects to, "
                                                 "from the start (it waits for the browser); its token is the "
                                                 "session's first automate token (revocable); null otherwise"}),
            "bidi_url": _nullable({"type": "string", "pattern": "^ws://",
                                   "description": "with automation (Firefox): the WebDriver BiDi WebSocket, with the "
                                                  "session's first automate token; null otherwise"}),
        },
        "examples": [SESSION_EXAMPLE, ENDED_EXAMPLE],
    },
    "Features": {
        "type": "object", "description": "what the session's profile lets cross between guest and user (features.py)",
        "properties": {
            "clipboard": {"type": "object", "properties": {"to_guest": {"type": "boolean"},
                                                           "from_guest": {"type": "boolean"},
                                                           "max_bytes": {"type": "integer"}}},
            "downloads": {"type": "object", "properties": {"enabled": {"type": "boolean"},
                                                           "max_mib": {"type": "integer"},
                                                           "total_mib": {"type": "integer"},
                                                           "total_files": {"type": "integer"}}},
            "uploads": {"type": "object", "properties": {"enabled": {"type": "boolean"},
                                                         "max_mib": {"type": "integer"}}},
            "audio": {"type": "boolean"}},
    },
    "Download": {
        "type": "object", "required": ["name", "size", "complete"],
        "description": "a file in the guest's ~/Downloads (its name is guest data: checked, never a path)",
        "properties": {"name": {"type": "string"}, "size": {"type": "integer"}, "complete": {"type": "boolean"}},
    },
    "DownloadList": {"type": "object", "required": ["downloads"],
                     "properties": {"downloads": {"type": "array", "items": _ref("Download")}},
                     "examples": [{"downloads": [{"name": "report.pdf", "size": 48213, "complete": True},
                                                 {"name": "big.iso", "size": 1048576, "complete": False}]}]},
    "Upload": {"type": "object", "required": ["name", "size"],
               "properties": {"name": {"type": "string", "description": "the name it got in ~/Uploads"},
                              "size": {"type": "integer"}, "directory": {"type": "string"}},
               "examples": [{"name": "notes.txt", "size": 120, "directory": "~/Uploads"}]},
    "Clipboard": {"type": "object", "required": ["text"], "additionalProperties": False,
                  "properties": {"text": {"type": "string"}}, "examples": [{"text": "copied"}]},
    "GuestRequest": {
        "type": "object", "required": ["kind", "dest", "count"],
        "description": "one kind of request the guest made (net/capture.py); names are escaped guest data",
        "properties": {"kind": {"enum": ["dns", "tcp", "udp", "icmp", "ip", "ipv6", "other"]},
                       "dest": {"type": "string"}, "port": _nullable({"type": "integer"}),
                       "name": _nullable({"type": "string"}), "qtype": _nullable({"type": "string"}),
                       "count": {"type": "integer"}, "first_s": {"type": "number"}},
    },
    "SessionList": {"type": "object", "required": ["sessions"],
                    "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
                    "examples": [{"sessions": [SESSION_EXAMPLE]}]},
    "Profile": {
        "type": "object", "required": ["name", "image", "display", "image_exists", "error"],
        "properties": {
            "name": {"type": "string"}, "image": _nullable({"type": "string"}),
            "display": _nullable({"enum": ["web", "x11", "none"]}), "memory_mib": _nullable({"type": "integer"}),
            "vcpus": _nullable({"type": "integer"}), "idle_timeout_s": _nullable({"type": "number"}),
            "max_lifetime_s": _nullable({"type": "number"}), "image_exists": {"type": "boolean"},
            "source": _nullable({"type": "string"}),
            "error": _nullable({"type": "string", "description": "why this profile file cannot be used"}),
        },
    },
    "ProfileList": {"type": "object", "required": ["profiles"],
                    "properties": {"profiles": {"type": "array", "items": _ref("Profile")}},
                    "examples": [{"profiles": [{
                        "name": "chromium", "image": "chromium", "display": "web", "memory_mib": 2048, "vcpus": 2,
                        "idle_timeout_s": 0.0, "max_lifetime_s": 0.0, "image_exists": True,
                        "source": "/usr/lib/python3/dist-packages/dispo/builtin_profiles/chromium.toml",
                        "error": None}]}]},
    "Image": {
        "type": "object", "required": ["name", "size", "sha256", "digest", "storage", "created", "bootable"],
        "properties": {"name": {"type": "string"}, "size": {"type": "integer"},
                       "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                  "description": "the sha256 of the root filesystem (rootfs.ext4) alone"},
                       "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                  "description": "the image's content digest, its identity on every host: the "
                                                 "sha256 of its manifest (every file's sha256 and the portable "
                                                 "image.json keys); what 'dispo image ls' shows and 'dispo image "
                                                 "load --sha256' checks"},
                       "storage": {"enum": ["btrfs", "reflink", "copy"]}, "created": {"type": "number"},
                       "bootable": {"type": "boolean"}, "arch": {"type": "string"},
                       "vmms": {"type": "array", "items": {"type": "string"}}},
    },
    "ImageList": {"type": "object", "required": ["images"],
                  "properties": {"images": {"type": "array", "items": _ref("Image")}},
                  "examples": [{"images": [{"name": "minimal", "size": 2147483648, "sha256": "ab" * 32,
                                            "digest": "cd" * 32,
                                            "storage": "btrfs", "created": 1735689600.0, "bootable": True,
                                            "arch": "x86_64", "vmms": ["qemu", "firecracker"]}]}]},
    "Event": {
        "type": "object", "required": ["kind", "session_id", "message", "fields", "time"],
        "additionalProperties": False,
        "description": "one SSE message's data (runtime/events.py); the SSE event name is the kind, and the kind "
                       "says what `fields` holds",
        "properties": {"kind": {"enum": [k.value for k in EventKind]}, "session_id": SESSION_ID,
                       "message": {"type": "string", "description": "one line for people"},
                       "fields": {"type": "object"}, "time": {"type": "number", "description": "seconds since the "
                                                                                               "epoch"}},
        "allOf": [{"if": {"properties": {"kind": {"const": kind}}}, "then": {"properties": {"fields": fields}}}
                  for kind, fields in EVENT_FIELDS.items()],
        "examples": [{"kind": "state", "session_id": "5e6f7a8b", "message": "ended: the command exited with status 7",
                      "fields": ENDED_EXAMPLE, "time": 1735689612.5},
                     {"kind": "ended", "session_id": "5e6f7a8b", "message": "the command exited with status 7",
                      "fields": {"exit_status": 7, "end_reason": "the command exited with status 7",
                                 "end_kind": "exited", "error": None,
                                 "console_tail": ""}, "time": 1735689612.5}],
    },
    "SseMessage": {
        "type": "object", "required": ["event", "data"], "additionalProperties": False,
        "description": "one message of the event stream (OpenAPI 3.2 itemSchema): `event: KIND`, `data: JSON`",
        "properties": {"event": {"enum": [k.value for k in EventKind]},
                       "data": {"type": "string", "contentMediaType": JSON, "contentSchema": _ref("Event")}},
    },
    "Health": {
        "type": "object", "required": ["status", "version", "sessions", "max_sessions"],
        "properties": {"status": {"const": "ok"}, "version": {"type": "string"}, "sessions": {"type": "integer"},
                       "max_sessions": {"type": "integer"}, "machinery": {"type": "string"},
                       "uptime_s": {"type": "number"},
                       "viewers": {"type": "boolean", "description": "web viewers are served (dispod listens on "
                                                                    "TCP); false: the unix socket alone"}},
        "examples": [{"status": "ok", "version": __version__, "sessions": 1, "max_sessions": 4, "machinery": "real",
                      "uptime_s": 3600.0, "viewers": True}],
    },
    "Pool": {
        "type": "object", "required": ["budget_mib", "used_mib", "slots"],
        "properties": {
            "budget_mib": {"type": "integer", "description": "memory the pooled guests may hold together"},
            "used_mib": {"type": "integer"},
            "slots": {"type": "array", "items": {
                "type": "object", "required": ["name", "target", "ready", "starting"],
                "properties": {"name": {"type": "string"}, "target": {"type": "integer"}, "ready": {"type": "integer"},
                               "starting": {"type": "integer"}, "template": _nullable({"type": "string"}),
                               "memory_mib": {"type": "integer"}, "last_error": _nullable({"type": "string"})}}},
        },
        "examples": [{"budget_mib": 6144, "used_mib": 2048, "slots": [
            {"name": "chromium", "target": 1, "ready": 1, "starting": 0, "template": "profile-chromium",
             "memory_mib": 2048, "last_error": None}]}],
    },
    "PoolFill": {"type": "object", "additionalProperties": False, "required": ["count"],
                 "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 64,
                                          "description": "a whole number (3.0 is 3; 3.5 is refused)"}},
                 "examples": [{"count": 1}]},
    "TokenCreate": {"type": "object", "additionalProperties": False, "required": ["scope"],
                    "properties": {"scope": SCOPE}, "examples": [{"scope": "view"}]},
    "TokenCreated": {
        "type": "object", "required": ["id", "token", "scope", "url"],
        "description": "the token itself is shown here once; the listing names it by its id alone",
        "properties": {"id": TOKEN_ID, "token": {"type": "string", "description": "the secret: in the link, or "
                                                                                  "as the automation endpoint's"},
                       "scope": SCOPE,
                       "url": _nullable({"type": "string", "description": "view and interact: the viewer link; "
                                                                          "automate: the session's automation "
                                                                          "URL (cdp or bidi) with this token; "
                                                                          "null if it has no automation"})},
        "examples": [{"id": "0a1b2c3d4e5f", "token": "q9Vb3kTn0xW2gk3N1yQmU8rA1B2c3D4e", "scope": "view",
                      "url": "http://127.0.0.1:8686/viewer/1a2b3c4d/q9Vb3kTn0xW2gk3N1yQmU8rA1B2c3D4e/"}],
    },
    "Token": {
        "type": "object", "required": ["id", "scope", "created", "connections"],
        "properties": {"id": TOKEN_ID, "scope": SCOPE, "created": {"type": "number",
                                                                   "description": "seconds since the epoch"},
                       "connections": {"type": "integer", "description": "WebSockets open with it now (a viewer's "
                                                                       "streams, or automation connections)"}},
        "examples": [{"id": "0a1b2c3d4e5f", "scope": "interact", "created": 1735689600.0, "connections": 1}],
    },
    "TakeOver": {
        "type": "object", "required": ["revoked", "connections", "id", "token", "scope", "url"],
        "description": "the session's automate tokens, revoked (their connections closed before the answer), "
                       "and a new interact token for the person who took over, shown this once",
        "properties": {"revoked": {"type": "array", "items": _ref("Token")},
                       "connections": {"type": "integer", "description": "automation connections closed"},
                       "id": TOKEN_ID, "token": {"type": "string", "description": "the new interact token"},
                       "scope": {"const": "interact"},
                       "url": {"type": "string", "description": "the viewer link of the new token"}},
        "examples": [{"revoked": [{"id": "0a1b2c3d4e5f", "scope": "automate", "created": 1735689600.0,
                                   "connections": 1}], "connections": 1, "id": "5f4e3d2c1b0a",
                      "token": "q9Vb3kTn0xW2gk3N1yQmU8rA1B2c3D4e", "scope": "interact",
                      "url": "http://127.0.0.1:8686/viewer/1a2b3c4d/q9Vb3kTn0xW2gk3N1yQmU8rA1B2c3D4e/"}],
    },
    "TokenList": {"type": "object", "required": ["tokens"],
                  "properties": {"tokens": {"type": "array", "items": _ref("Token")}}},
    "Problem": {
        "type": "object", "required": ["type", "title", "status", "detail", "hint"],
        "description": "RFC 9457. `title` names the error's class in dispo's exception tree; `detail` is its "
                       "one-line message and `hint` how to fix it. Classes with fields add them as extension "
                       "members (docs/api.md).",
        "properties": {"type": {"type": "string", "format": "uri"}, "title": {"type": "string"},
                       "status": {"type": "integer"}, "detail": {"type": "string"}, "hint": {"type": "string"}},
        "examples": [PROBLEM_EXAMPLE, BUSY_EXAMPLE],
    },
}

_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": SESSION_ID}
_AUTH = _problem("no or a wrong token (TCP only); WWW-Authenticate: Bearer")
_BAD_ID = _problem("not a session id")
_UNKNOWN = _problem("no such session")
_NOT_NOW = _problem("the session has no running guest yet, or is ending")
_BAD_FLAG = "?FLAG= not given once as 1, true, 0 or false"
_NO_VIEWER = _problem("the session has no viewer (no web display), or (POST) it ended")

PATHS: dict[str, Any] = {
    "/v1/sessions": {
        "post": {
            "operationId": "createSession", "summary": "Start a session (returns at once, state starting)",
            "requestBody": {"required": True, "content": {JSON: {
                "schema": _ref("SessionCreate"),
                "examples": {"browser": {"value": {"profile": "chromium", "url": "https://example.org/"}},
                             "command": {"value": {"image": "minimal", "command": ["sh", "-c", "echo hi; exit 7"]}}}}}},
            "responses": {
                "201": {"description": "started; Location: /v1/sessions/{id}; for a web display viewer_url is set",
                        "content": {JSON: {"schema": _ref("Session"), "example": {
                            **SESSION_EXAMPLE, "state": "starting", "step": "validate", "age_s": 0.0, "address": None,
                            "accel": None}}}},
                "400": _problem("the request is not valid (unknown key, bad value, unknown profile ...)",
                                PROBLEM_EXAMPLE),
                "401": _AUTH, "403": _problem("a foreign Origin or Host"),
                "404": _problem("the profile or image does not exist"),
                "409": _problem("the profile or image cannot serve it (a profile without keep_path for `keep`, an "
                                "image not built for `backend`, no template that fits for start warm, a volume in "
                                "use)"),
                "413": _problem("the body is larger than 64 KiB"), "415": _problem("the body is not JSON"),
                "429": {**_problem("max_sessions sessions are running", BUSY_EXAMPLE),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
            },
        },
        "get": {
            "operationId": "listSessions", "summary": "The live sessions (?all=1: also recently ended ones)",
            "parameters": [{"name": "all", "in": "query", "schema": FLAG,
                            "description": "1 or true: also the sessions that ended recently (absent: 0)"}],
            "responses": {"200": {"description": "oldest first", "content": {JSON: {"schema": _ref("SessionList")}}},
                          "400": _problem(_BAD_FLAG.replace("FLAG", "all")), "401": _AUTH},
        },
    },
    "/v1/sessions/{id}": {
        "parameters": [_ID_PARAM],
        "get": {
            "operationId": "getSession", "summary": "A session's state (exit_status and end_reason once known)",
            "responses": {"200": {"description": "the session", "content": {JSON: {"schema": _ref("Session"),
                                                                                  "example": ENDED_EXAMPLE}}},
                          "400": _BAD_ID, "401": _AUTH, "404": _UNKNOWN},
        },
        "delete": {
            "operationId": "deleteSession", "summary": "End the session; everything it made is removed",
            "parameters": [{"name": "wait", "in": "query", "schema": FLAG,
                            "description": "1 or true: answer once the session ended and its teardown is done "
                                           "(absent: 0)"}],
            "responses": {
                "200": {"description": "it has ended", "content": {JSON: {"schema": _ref("Session")}}},
                "202": {"description": "it is ending (state stopping)", "content": {JSON: {"schema": _ref("Session")}}},
                "400": _problem("not a session id, or " + _BAD_FLAG.replace("FLAG", "wait")), "401": _AUTH,
                "403": _problem("a foreign Origin"), "404": _UNKNOWN},
        },
    },
    "/v1/sessions/{id}/downloads": {
        "parameters": [_ID_PARAM],
        "get": {
            "operationId": "listDownloads", "summary": "What the guest's browser downloaded (~/Downloads)",
            "responses": {"200": {"description": "the downloads", "content": {JSON: {"schema": _ref("DownloadList")}}},
                          "400": _BAD_ID, "401": _AUTH, "403": _problem("downloads are off in the profile"),
                          "404": _UNKNOWN, "409": _NOT_NOW,
                          "502": _problem("the guest did not answer, or answered too much")},
        },
    },
    "/v1/sessions/{id}/downloads/{name}": {
        "parameters": [_ID_PARAM, {"name": "name", "in": "path", "required": True, "schema": GUEST_FILE}],
        "get": {
            "operationId": "getDownload", "summary": "A complete download's bytes (Content-Disposition: attachment)",
            "responses": {"200": {"description": "the file", "content": {"application/octet-stream": {}}},
                          "400": _problem("not a file name"), "401": _AUTH,
                          "403": _problem("downloads are off in the profile"),
                          "404": _problem("no such download, or not complete yet"), "409": _NOT_NOW,
                          "413": _problem("bigger than the profile's [downloads] max_mib"),
                          "502": _problem("the guest did not answer")},
        },
    },
    "/v1/sessions/{id}/recording": {
        "parameters": [_ID_PARAM],
        "get": {
            "operationId": "getRecording",
            "summary": "A recorded session's video (WebM, VP8), once it ended; its sha256 is in the disposal receipt",
            "responses": {"200": {"description": "the video (Content-Disposition: attachment)",
                                  "content": {"video/webm": {}}},
                          "400": _problem("not a session id"), "401": _AUTH,
                          "404": _problem("no recording: the session did not record, is still recording, or its "
                                          "recording was removed ('dispo recording rm', [recordings] max_age_h)")},
        },
    },
    "/v1/sessions/{id}/uploads": {
        "parameters": [_ID_PARAM],
        "post": {
            "operationId": "upload", "summary": "Put the body into the guest's ~/Uploads as ?name=FILENAME",
            "parameters": [{"name": "name", "in": "query", "required": True, "schema": UPLOAD_NAME}],
            # Not required: no body is an empty file (Content-Length: 0), which is a file like any other.
            "requestBody": {"required": False, "content": {"application/octet-stream": {}}},
            "responses": {"201": {"description": "stored", "content": {JSON: {"schema": _ref("Upload")}}},
                          "400": _problem("no or a bad name"), "401": _AUTH,
                          "403": _problem("uploads are off in the profile, or a foreign Origin"),
                          "404": _UNKNOWN, "409": _NOT_NOW,
                          "408": _problem("the body came too slowly ([service] body_timeout_s)"),
                          "411": _problem("no Content-Length"),
                          "413": _problem("bigger than the profile's [uploads] max_mib"),
                          "429": _problem("too many uploads under way (in the session, or in dispod)"),
                          "502": _problem("the guest did not take it")},
        },
    },
    "/v1/sessions/{id}/clipboard": {
        "parameters": [_ID_PARAM],
        "get": {
            "operationId": "getClipboard", "summary": "The guest's X clipboard, as text",
            "responses": {"200": {"description": "the text", "content": {JSON: {"schema": _ref("Clipboard")}}},
                          "400": _BAD_ID, "401": _AUTH,
                          "403": _problem("the profile keeps the clipboard in the guest ([clipboard] from_guest)"),
                          "404": _UNKNOWN, "409": _NOT_NOW,
                          "502": _problem("the guest did not answer, or answered too much")},
        },
        "put": {
            "operationId": "setClipboard", "summary": "Set the guest's X clipboard (JSON {text} or text/plain)",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Clipboard")}, "text/plain": {}}},
            "responses": {"200": {"description": "set", "content": {JSON: {"schema": _ref("Clipboard")}}},
                          "400": _problem("not text"), "401": _AUTH,
                          "403": _problem("the profile keeps the clipboard out ([clipboard] to_guest)"),
                          "404": _UNKNOWN, "409": _NOT_NOW,
                          "408": _problem("the body came too slowly ([service] body_timeout_s)"),
                          "413": _problem("longer than [clipboard] max_bytes"),
                          "502": _problem("the guest did not take it")},
        },
    },
    "/v1/sessions/{id}/tokens": {
        "parameters": [_ID_PARAM],
        "post": {
            "operationId": "createToken", "summary": "A new token of the session, of one scope (view, interact, "
                                                     "automate)",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("TokenCreate")}}},
            "responses": {"201": {"description": "the token, shown this once",
                                  "content": {JSON: {"schema": _ref("TokenCreated")}}},
                          "400": _problem("not a session id, or not {\"scope\": S}"), "401": _AUTH,
                          "403": _problem("a foreign Origin"), "404": _UNKNOWN, "409": _NO_VIEWER,
                          "413": _problem("the body is larger than 64 KiB"), "415": _problem("the body is not JSON"),
                          "429": {**_problem("the session has 32 tokens already"),
                                  "headers": {"Retry-After": {"schema": {"type": "integer"}}}}},
        },
        "get": {
            "operationId": "listTokens", "summary": "The session's tokens, by id and scope (never the secrets)",
            "responses": {"200": {"description": "oldest first; the first is viewer_url's unless revoked, "
                                                 "and with automation the next is cdp_url's (bidi_url's)",
                                  "content": {JSON: {"schema": _ref("TokenList")}}},
                          "400": _BAD_ID, "401": _AUTH, "404": _UNKNOWN, "409": _NO_VIEWER},
        },
    },
    "/v1/sessions/{id}/tokens/{token}": {
        "parameters": [_ID_PARAM, {"name": "token", "in": "path", "required": True, "schema": TOKEN_OR_ID}],
        "delete": {
            "operationId": "revokeToken", "summary": "Revoke a token at once: refused from now on, and the "
                                                     "WebSockets opened with it are closed before the answer",
            "responses": {"200": {"description": "revoked; `connections`: the WebSockets it closed",
                                  "content": {JSON: {"schema": _ref("Token")}}},
                          "400": _problem("not a session id, or not a token or id"), "401": _AUTH,
                          "403": _problem("a foreign Origin"), "404": _problem("no such session, or no such token"),
                          "409": _NO_VIEWER},
        },
    },
    "/v1/sessions/{id}/takeover": {
        "parameters": [_ID_PARAM],
        "post": {
            "operationId": "takeOver", "summary": "A person takes over from the programs: every automate token "
                                                  "revoked, its connections closed, and a new interact link",
            "responses": {"200": {"description": "taken over; the viewer link is the person's",
                                  "content": {JSON: {"schema": _ref("TakeOver")}}},
                          "400": _BAD_ID, "401": _AUTH, "403": _problem("a foreign Origin"), "404": _UNKNOWN,
                          "409": _NO_VIEWER,
                          "429": {**_problem("the session has 32 tokens already (none of them automate)"),
                                  "headers": {"Retry-After": {"schema": {"type": "integer"}}}}},
        },
    },
    "/v1/pool": {"get": {
        "operationId": "getPool", "summary": "The warm pool: per profile or image, its target and waiting guests",
        "responses": {"200": {"description": "the pool", "content": {JSON: {"schema": _ref("Pool")}}},
                      "401": _AUTH}}},
    "/v1/pool/{name}": {
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": NAME}],
        "put": {
            "operationId": "fillPool", "summary": "Keep COUNT guests of NAME's template restored and waiting",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PoolFill")}}},
            "responses": {"200": {"description": "the pool", "content": {JSON: {"schema": _ref("Pool")}}},
                          "400": _problem("a bad count, or over the memory budget"), "401": _AUTH,
                          "403": _problem("a foreign Origin"),
                          "404": _problem("no template of NAME (dispo template build NAME)"),
                          "415": _problem("the body is not JSON")}},
        "delete": {
            "operationId": "drainPool", "summary": "Stop NAME's waiting guests and keep none",
            "responses": {"200": {"description": "the pool", "content": {JSON: {"schema": _ref("Pool")}}},
                          "401": _AUTH, "403": _problem("a foreign Origin"),
                          "404": _problem("NAME is not in the pool")}},
    },
    "/v1/profiles": {"get": {
        "operationId": "listProfiles", "summary": "The profiles a session can start from",
        "responses": {"200": {"description": "by name", "content": {JSON: {"schema": _ref("ProfileList")}}},
                      "401": _AUTH}}},
    "/v1/images": {"get": {
        "operationId": "listImages", "summary": "The known-good images",
        "responses": {"200": {"description": "by name", "content": {JSON: {"schema": _ref("ImageList")}}},
                      "401": _AUTH}}},
    "/v1/events": {"get": {
        "operationId": "events", "summary": "Server-Sent Events: the sessions' state changes, output and ends",
        "description": "Each message is `event: KIND` and `data: <Event as JSON>`. The stream starts with a `state` "
                       "event per live session (or the one asked for), then follows events as they happen; comment "
                       "lines keep it open. With ?session=ID it ends after that session's `ended` event and its "
                       "final `state` event. The token may be given as ?access_token= here (EventSource sends no "
                       "headers).",
        "parameters": [{"name": "session", "in": "query", "schema": SESSION_ID},
                       {"name": "access_token", "in": "query", "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the stream", "content": {SSE: {"itemSchema": _ref("SseMessage")}}},
                      "400": _BAD_ID, "401": _AUTH, "404": _UNKNOWN}}},
    "/v1/openapi.json": {"get": {
        "operationId": "openapi", "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.2", "content": {JSON: {"schema": {"type": "object"}}}},
                      "401": _AUTH}}},
    "/v1/health": {"get": {
        "operationId": "health", "summary": "dispod answers",
        "responses": {"200": {"description": "ok", "content": {JSON: {"schema": _ref("Health")}}}, "401": _AUTH}}},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.2.0",  # 3.2: itemSchema describes each message of the event stream
    "info": {"title": "dispod", "version": __version__,
             "description": "Disposable sessions in microVMs. On the unix socket <state_dir>/dispod.sock (root-only) "
                            "no token is needed; on TCP every /v1 call needs `Authorization: Bearer TOKEN`. Errors "
                            "are application/problem+json. See docs/api.md."},
    "servers": [{"url": "http://127.0.0.1:8686", "description": "with dispod --listen 127.0.0.1:8686"}],
    "security": [{"bearer": []}, {}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "dispod's access token (<state_dir>/dispod.token); TCP only"},
            "accessToken": {"type": "apiKey", "in": "query", "name": "access_token",
                            "description": "the same token, for GET /v1/events alone"}},
    },
}


def document() -> dict[str, Any]:
    return copy.deepcopy(DOCUMENT)
