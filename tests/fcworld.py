"""A world for Firecracker tests: the real binaries (or a skip reason), the tiny ELF guest (from
dispo.vmm.firecracker.probe), the API contract check, and network namespaces the test enters."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dispo.vmm.firecracker.binaries import find_firecracker, find_jailer, version_of
from dispo.vmm.firecracker.probe import GUEST_BYE, GUEST_LINE, GuestMode, guest_code, tiny_elf

__all__ = ["GUEST_BYE", "GUEST_LINE", "GuestMode", "guest_code", "tiny_elf"]

def firecracker_or_skip_reason() -> tuple[Path | None, str]:
    """The firecracker binary to test with, or why the real-binary tests skip."""
    if platform.machine() != "x86_64":
        return None, "the tiny test guest is x86_64 machine code"
    try:
        binary = find_firecracker()
    except Exception as e:
        return None, f"no firecracker binary ({e}); set $DISPO_FIRECRACKER or install one (DEVELOPERS.md)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None, "no read/write access to /dev/kvm"
    return binary, ""


def jailer_pair_or_skip_reason() -> tuple[tuple[Path, Path] | None, str]:
    """(jailer, firecracker of the same version), or why the jailer tests skip."""
    fc, why = firecracker_or_skip_reason()
    if fc is None:
        return None, why
    if os.geteuid() != 0:
        return None, "the jailer needs root"
    try:
        jailer = find_jailer()
    except Exception as e:
        return None, f"no jailer binary ({e}); set $DISPO_JAILER"
    want = version_of(jailer)
    candidates = [Path(p) for p in (os.environ.get("DISPO_JAILER_FIRECRACKER", ""), str(fc),
                                    shutil.which(f"firecracker-v{want}") or "") if p]
    for cand in candidates:
        if cand.exists() and version_of(cand) == want:
            return (jailer, cand), ""
    return None, f"no firecracker binary of the jailer's version {want} (set $DISPO_JAILER_FIRECRACKER)"


# -- the API contract ------------------------------------------------------------------------------
SPEC_NAME = "firecracker-v1.16.1.yaml"
SPEC_PLACES = (Path(__file__).resolve().parents[1].parent / "shared" / "firecracker" / SPEC_NAME,
               Path(__file__).resolve().parent / "data" / SPEC_NAME)


def _strict(node: Any) -> Any:
    """The spec as Firecracker enforces it: unknown fields are rejected, so every object is closed.

    PyYAML (YAML 1.1) reads the Logger level `Off` as false: put the string back.
    """
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and out.get("type", "object") == "object":
            out.setdefault("additionalProperties", False)
        if "enum" in out:
            out["enum"] = ["Off" if v is False else v for v in out["enum"]]
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


class SpecViolation(AssertionError):
    pass


class Contract:
    """Checks a Request (operation, method, path, body) against the OpenAPI document."""

    def __init__(self, spec_path: Path | None = None) -> None:
        path = spec_path or next(p for p in SPEC_PLACES if p.exists())
        self.doc = yaml.safe_load(path.read_text())
        self.version = str(self.doc["info"]["version"])
        self.definitions = _strict(self.doc["definitions"])
        self.routes: list[tuple[re.Pattern[str], str, dict[str, Any]]] = []
        for template, ops in self.doc["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
            for method, op in ops.items():
                if isinstance(op, dict) and "operationId" in op:
                    self.routes.append((pattern, method.upper(), op))

    def operation(self, method: str, path: str) -> dict[str, Any]:
        for pattern, m, op in self.routes:
            if m == method and pattern.match(path):
                return op
        raise SpecViolation(f"{method} {path} is not in the spec")

    def check(self, req: Any) -> None:
        op = self.operation(req.method, req.path)
        if op["operationId"] != req.operation:
            raise SpecViolation(f"{req.method} {req.path} is {op['operationId']} in the spec, "
                                f"the client calls it {req.operation}")
        params = [p for p in op.get("parameters", []) if p.get("in") == "body"]
        if not params:
            if req.body is not None:
                raise SpecViolation(f"{req.operation} takes no body, the client sent {req.body}")
            return
        if req.body is None:
            if params[0].get("required"):
                raise SpecViolation(f"{req.operation} needs a body")
            return
        schema = {**_strict(params[0]["schema"]), "definitions": self.definitions}
        validator = jsonschema.Draft4Validator(schema)
        errors = sorted(validator.iter_errors(req.body), key=str)
        if errors:
            raise SpecViolation(f"{req.operation} body {req.body} violates the spec: {errors[0].message}")


# -- network namespaces -----------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def inside_new_netns(prefix: str = "dspfc") -> Iterator[str]:
    """Create a network namespace, move this thread into it (children inherit it), and undo both.

    Taps and firecracker processes started inside live in the namespace, away from the host's network.
    """
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        ns = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(ns)
        finally:
            os.close(ns)
        try:
            yield name
        finally:
            _setns(home)
    finally:
        os.close(home)
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def add_upstream() -> None:
    """In the current (test) namespace, what attach_network needs: an upstream link with a default route
    (to a documentation address nobody answers) and IPv4 forwarding, in this namespace only."""
    for argv in (["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1"],
                 ["ip", "link", "set", "up1", "up"], ["ip", "link", "set", "up0", "up"],
                 ["ip", "addr", "add", "203.0.113.1/24", "dev", "up0"],
                 ["ip", "route", "add", "default", "via", "203.0.113.2"],
                 ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]):
        subprocess.run(argv, check=True, capture_output=True)


def make_tap(name: str) -> str:
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True, capture_output=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
    return name


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (the session id is in every firecracker's --id)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()  # noqa: SIM115
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
