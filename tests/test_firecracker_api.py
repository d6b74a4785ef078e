"""Every request the Firecracker client can make, checked against the published OpenAPI spec.

No binary needed: the requests go to a recording transport (httpx.MockTransport, a stand-in for the
server that only answers 204) and each one is validated against the spec with unknown fields rejected,
as the real server does. The real-binary tests in test_firecracker.py use the same contract check.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispo.errors import ApiError, ApiUnreachable, VmmError
from dispo.vmm.firecracker.api import (
    MAX_ANSWER,
    CacheType,
    FirecrackerApi,
    IoEngine,
    LogLevel,
    NetworkOverride,
    Request,
    SnapshotType,
)
from tests import fakes
from tests.fcworld import Contract, SpecViolation

P = Path("/srv/x")

# One entry per client method (several for methods whose bodies vary); each exercises every argument.
CALLS: dict[str, list[Callable[[FirecrackerApi], Any]]] = {
    "describe_instance": [lambda a: a.describe_instance()],
    "get_version": [lambda a: a.get_version()],
    "get_machine_config": [lambda a: a.get_machine_config()],
    "get_vm_config": [lambda a: a.get_vm_config()],
    "put_logger": [lambda a: a.put_logger(P / "log"),
                   *[(lambda a, lv=lv: a.put_logger(P / "log", level=lv, show_level=True, show_log_origin=False,
                                                    module="api_server")) for lv in LogLevel]],
    "put_metrics": [lambda a: a.put_metrics(P / "metrics")],
    "put_machine_config": [lambda a: a.put_machine_config(vcpu_count=2, mem_size_mib=256),
                           lambda a: a.put_machine_config(vcpu_count=1, mem_size_mib=128, smt=False,
                                                          track_dirty_pages=True, huge_pages="2M")],
    "patch_machine_config": [lambda a: a.patch_machine_config(vcpu_count=2, mem_size_mib=512)],
    "put_boot_source": [lambda a: a.put_boot_source(P / "vmlinux"),
                        lambda a: a.put_boot_source(P / "vmlinux", boot_args="console=ttyS0",
                                                    initrd_path=P / "initrd")],
    "put_drive": [lambda a: a.put_drive("rootfs", P / "disk", is_root_device=True),
                  *[(lambda a, c=c, io=io: a.put_drive("data_1", P / "d", is_root_device=False, is_read_only=True,
                                                       cache_type=c, io_engine=io, partuuid="abc"))
                    for c in CacheType for io in IoEngine]],
    "patch_drive": [lambda a: a.patch_drive("rootfs", P / "other")],
    "put_network_interface": [lambda a: a.put_network_interface("eth0", "dsp-1a2b3c4d"),
                              lambda a: a.put_network_interface("eth0", "dsp-1a2b3c4d",
                                                                guest_mac="06:00:ac:14:00:06")],
    "put_vsock": [lambda a: a.put_vsock(3, P / "v.sock")],
    "put_entropy": [lambda a: a.put_entropy()],
    "action": [],  # covered through the three named actions below
    "instance_start": [lambda a: a.instance_start()],
    "send_ctrl_alt_del": [lambda a: a.send_ctrl_alt_del()],
    "flush_metrics": [lambda a: a.flush_metrics()],
    "pause": [lambda a: a.pause()],
    "resume": [lambda a: a.resume()],
    "snapshot_create": [lambda a: a.snapshot_create(P / "s", P / "m"),
                        *[(lambda a, k=k: a.snapshot_create(P / "s", P / "m", snapshot_type=k)) for k in SnapshotType]],
    "snapshot_load": [lambda a: a.snapshot_load(P / "s", P / "m"),
                      lambda a: a.snapshot_load(P / "s", P / "m", resume_vm=True, track_dirty_pages=True,
                                                network_overrides=[NetworkOverride("eth0", "dsp-00000001")],
                                                vsock_uds_path=P / "v.sock")],
}
NOT_API_CALLS = {"call", "ping", "close"}


class Recorder:
    """Stands in for the server: records requests and answers 204 (or {} for GETs)."""

    def __init__(self, status: int = 204, body: Any = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status, self.body = status, body

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 204:
            return httpx.Response(self.status, json=self.body)
        if request.method == "GET":
            return httpx.Response(200, json={})
        return httpx.Response(204)


def client(contract: Contract, seen: list[Request], recorder: Recorder | None = None) -> FirecrackerApi:
    def hook(req: Request) -> None:
        seen.append(req)
        contract.check(req)

    return FirecrackerApi(Path("/nonexistent.sock"), on_request=hook,
                          transport=httpx.MockTransport(recorder or Recorder()))


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract()


def test_every_public_method_has_a_case() -> None:
    methods = {n for n, _ in inspect.getmembers(FirecrackerApi, inspect.isfunction) if not n.startswith("_")}
    assert methods - NOT_API_CALLS == set(CALLS), "add the new client method to CALLS so its body is checked"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_request_bodies_match_the_spec(contract: Contract, name: str) -> None:
    seen: list[Request] = []
    recorder = Recorder()
    api = client(contract, seen, recorder)
    for call in CALLS[name]:
        call(api)
    assert len(seen) == len(recorder.requests) == len(CALLS[name])
    for req, sent in zip(seen, recorder.requests, strict=True):
        # What went on the wire is what was checked.
        assert sent.method == req.method and sent.url.path == req.path
        if req.body is None:
            assert sent.content == b""
        else:
            assert httpx.Response(200, content=sent.content).json() == req.body


def test_every_spec_operation_the_client_uses_is_covered(contract: Contract) -> None:
    seen: list[Request] = []
    api = client(contract, seen)
    for calls in CALLS.values():
        for call in calls:
            call(api)
    used = {r.operation for r in seen}
    # The operations a session needs (the list), all present and all spec-valid.
    assert {"putLogger", "putMetrics", "putMachineConfiguration", "putGuestBootSource", "putGuestDriveByID",
            "putGuestNetworkInterfaceByID", "putGuestVsock", "putEntropyDevice", "createSyncAction", "patchVm",
            "createSnapshot", "loadSnapshot"} <= used
    actions = {r.body["action_type"] for r in seen if r.operation == "createSyncAction" and r.body}
    assert actions == {"InstanceStart", "SendCtrlAltDel", "FlushMetrics"}


@pytest.mark.parametrize("case", [
    ("putMachineConfiguration", "PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}, "type"),
    ("putMachineConfiguration", "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 1, "bogus": 1}, "unknown"),
    ("putMachineConfiguration", "PUT", "/machine-config", {"vcpu_count": 1}, "required"),
    ("putGuestDriveByID", "PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": "yes"}, "type"),
    ("putLogger", "PUT", "/logger", {"log_path": "/x", "level": "Loud"}, "enum"),
    ("loadSnapshot", "PUT", "/snapshot/load",
     {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m", "x": 1}}, "nested unknown"),
    ("createSyncAction", "PUT", "/actions", {"action_type": "Reboot"}, "enum"),
    ("patchVm", "PATCH", "/vm", {"state": "Paused"}, "wrong operation name"),
    ("patchVm", "PUT", "/vm", {"state": "Paused"}, "no such route"),
])
def test_invalid_bodies_are_caught(contract: Contract, case: tuple[str, str, str, dict[str, Any], str]) -> None:
    operation, method, path, body, why = case
    if why == "wrong operation name":
        operation = "pauseVm"
    with pytest.raises(SpecViolation):
        contract.check(Request(operation, method, path, body))


def test_fault_message_becomes_a_typed_error_naming_the_call(contract: Contract) -> None:
    seen: list[Request] = []
    api = client(contract, seen, Recorder(400, {"fault_message": "The kernel file cannot be opened"}))
    with pytest.raises(ApiError) as e:
        api.put_boot_source(P / "vmlinux")
    assert e.value.operation == "putGuestBootSource" and e.value.api_status == 400
    assert "putGuestBootSource (PUT /boot-source)" in e.value.one_line()
    assert "The kernel file cannot be opened" in e.value.one_line()
    assert "\n" not in e.value.one_line()


def test_bad_resource_id_is_refused_before_sending() -> None:
    api = FirecrackerApi(Path("/nonexistent.sock"), transport=httpx.MockTransport(Recorder()))
    with pytest.raises(VmmError, match="invalid firecracker resource id"):
        api.put_drive("root-fs", P, is_root_device=True)


def test_dead_socket_is_a_one_line_error(tmp_path: Path) -> None:
    api = FirecrackerApi(tmp_path / "none.sock", timeout=1)
    assert not api.ping()
    with pytest.raises(ApiUnreachable, match="did not answer describeInstance"):
        api.describe_instance()


def test_no_jailer_means_dispos_own_sandbox_not_root(tmp_path: Path) -> None:
    """jail = "auto" and no jailer of the firecracker's version: every session (a browser or a command) gets
    dispo's own sandbox (test_firecracker.py runs it for real); jail = "off" is the explicit acceptance of root."""
    import dataclasses

    from dispo.config import Config, FirecrackerConfig, JailMode
    from dispo.vmm.base import MachineSpec
    from dispo.vmm.firecracker import backend

    fake_binary = tmp_path / "firecracker"
    fake_binary.write_text("#!/bin/sh\necho Firecracker v1.14.1\n")
    fake_binary.chmod(0o755)
    cfg = Config(workspace=tmp_path / "ws", state_dir=tmp_path / "st", firecracker=FirecrackerConfig(
        binary=str(fake_binary), jailer=str(tmp_path / "no-jailer"), jail=JailMode.AUTO))
    spec = MachineSpec("0badc0de", tmp_path / "vmlinux", tmp_path / "disk", tmp_path)
    browser = dataclasses.replace(spec, extra={"untrusted_app": "1"})
    for s in (spec, browser):  # never root: dispo's own sandbox (its uid, no capabilities, namespace, cgroups)
        jail = backend.create(cfg, s).jail
        assert jail is not None and jail.spec.own and jail.executable == fake_binary
        assert jail.spec.memory_limit_mib == s.memory_mib + backend.MEMORY_OVERHEAD_MIB
    off = dataclasses.replace(cfg, firecracker=dataclasses.replace(cfg.firecracker, jail=JailMode.OFF))
    assert backend.create(off, browser).jail is None


def test_the_real_connection_reads_an_answer(tmp_path: Path) -> None:
    body = b'{"id": "x", "state": "Running", "vmm_version": "1.14.1", "app_name": "Firecracker"}'
    answer = (b"HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    t = fakes.control_socket(tmp_path / "api.sock", [answer], ends=b"\r\n\r\n")
    with FirecrackerApi(tmp_path / "api.sock", timeout=5) as api:
        assert api.describe_instance()["state"] == "Running"
    t.join(5)


def test_an_oversized_answer_is_refused_while_it_is_read(tmp_path: Path) -> None:
    # A VMM a guest took over could answer without end: the client stops at its cap, not at the end.
    big = MAX_ANSWER * 4
    head = b"HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: " + str(big).encode() + b"\r\n\r\n"
    t = fakes.control_socket(tmp_path / "api.sock", [head + b"[" + b"0," * (big // 2 - 1) + b"0"], ends=b"\r\n\r\n")
    with FirecrackerApi(tmp_path / "api.sock", timeout=5) as api, pytest.raises(ApiUnreachable, match="more than"):
        api.describe_instance()
    t.join(5)
