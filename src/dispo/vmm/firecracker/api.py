"""A small typed client for Firecracker's REST API on its unix socket.

Each method is one API operation (named after the spec's operationId) and builds the JSON body from
keyword arguments, leaving out what is None so Firecracker's defaults apply. Every request passes through
`on_request` first: the tests hook it to validate each body against the published OpenAPI spec, so the
client cannot drift from the contract unnoticed.

Firecracker answers `HTTP/1.1 204 ` (empty reason phrase) and errors as 400 + {"fault_message": ...};
httpx (h11) accepts the former, and the latter becomes ApiError naming the operation.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from dispo.errors import ApiError, ApiUnreachable, VmmError

Json = dict[str, Any]
log = logging.getLogger(__name__)


class LogLevel(StrEnum):
    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"
    DEBUG = "Debug"
    TRACE = "Trace"
    OFF = "Off"


class CacheType(StrEnum):
    UNSAFE = "Unsafe"
    WRITEBACK = "Writeback"


class IoEngine(StrEnum):
    SYNC = "Sync"
    ASYNC = "Async"


class SnapshotType(StrEnum):
    FULL = "Full"
    DIFF = "Diff"


class Action(StrEnum):
    INSTANCE_START = "InstanceStart"
    SEND_CTRL_ALT_DEL = "SendCtrlAltDel"
    FLUSH_METRICS = "FlushMetrics"


@dataclass(frozen=True)
class Request:
    """One API call as sent: what `on_request` sees."""

    operation: str
    method: str
    path: str
    body: Json | None


@dataclass(frozen=True)
class NetworkOverride:
    iface_id: str
    host_dev_name: str


def _body(**fields: Any) -> Json:
    out: Json = {}
    for key, value in fields.items():
        if value is None:
            continue
        out[key] = str(value) if isinstance(value, Path) else value.value if isinstance(value, StrEnum) else value
    return out


@functools.cache
def _unused_tls() -> ssl.SSLContext:
    """A TLS context for a transport that never speaks TLS (http:// on a unix socket): made once, with no
    certificates loaded, so that httpx does not build one from the system's CA bundle for every client."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class FirecrackerApi:
    def __init__(self, socket: Path, *, timeout: float = 10.0,
                 on_request: Callable[[Request], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.socket = socket
        self.on_request = on_request
        # Plain HTTP on a unix socket: no TLS ever, so no certificate store to load (httpx's default context
        # reads the system's CA bundle, 0.1-0.4 s of every start here), and no proxy from the environment.
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=str(socket), verify=_unused_tls(), trust_env=False),
            base_url="http://localhost", timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirecrackerApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------
    def call(self, operation: str, method: str, path: str, body: Json | None = None) -> Json | None:
        req = Request(operation, method, path, body)
        log.debug("firecracker API %s: %s %s %s", operation, method, path, json.dumps(body) if body else "")
        if self.on_request is not None:
            self.on_request(req)
        try:
            resp = self._client.request(method, path, json=body)
        except (httpx.TransportError, OSError) as e:
            raise ApiUnreachable(f"firecracker API socket {self.socket} did not answer {operation}: {e}") from None
        if resp.is_success:
            return resp.json() if resp.content else None
        raise ApiError(operation, method, path, resp.status_code, _fault(resp))

    def ping(self) -> bool:
        """True if something answers on the socket (used while waiting for a fresh process)."""
        try:
            self._client.get("/")
        except (httpx.TransportError, OSError):
            return False
        return True

    # -- reads ------------------------------------------------------------------------------------
    def describe_instance(self) -> Json:
        return self.call("describeInstance", "GET", "/") or {}

    def get_version(self) -> str:
        return str((self.call("getFirecrackerVersion", "GET", "/version") or {}).get("firecracker_version", ""))

    def get_machine_config(self) -> Json:
        return self.call("getMachineConfiguration", "GET", "/machine-config") or {}

    def get_vm_config(self) -> Json:
        return self.call("getExportVmConfig", "GET", "/vm/config") or {}

    # -- pre-boot configuration -------------------------------------------------------------------
    def put_logger(self, log_path: Path, *, level: LogLevel | None = None, show_level: bool | None = None,
                   show_log_origin: bool | None = None, module: str | None = None) -> None:
        self.call("putLogger", "PUT", "/logger", _body(
            log_path=log_path, level=level, show_level=show_level, show_log_origin=show_log_origin, module=module))

    def put_metrics(self, metrics_path: Path) -> None:
        self.call("putMetrics", "PUT", "/metrics", _body(metrics_path=metrics_path))

    def put_machine_config(self, *, vcpu_count: int, mem_size_mib: int, smt: bool | None = None,
                           track_dirty_pages: bool | None = None, huge_pages: str | None = None) -> None:
        self.call("putMachineConfiguration", "PUT", "/machine-config", _body(
            vcpu_count=vcpu_count, mem_size_mib=mem_size_mib, smt=smt, track_dirty_pages=track_dirty_pages,
            huge_pages=huge_pages))

    def patch_machine_config(self, *, vcpu_count: int, mem_size_mib: int) -> None:
        # The spec reuses MachineConfiguration (both fields required) for PATCH.
        self.call("patchMachineConfiguration", "PATCH", "/machine-config",
                  _body(vcpu_count=vcpu_count, mem_size_mib=mem_size_mib))

    def put_boot_source(self, kernel_image_path: Path, *, boot_args: str | None = None,
                        initrd_path: Path | None = None) -> None:
        self.call("putGuestBootSource", "PUT", "/boot-source", _body(
            kernel_image_path=kernel_image_path, boot_args=boot_args, initrd_path=initrd_path))

    def put_drive(self, drive_id: str, path_on_host: Path, *, is_root_device: bool, is_read_only: bool = False,
                  cache_type: CacheType | None = None, io_engine: IoEngine | None = None,
                  partuuid: str | None = None) -> None:
        self.call("putGuestDriveByID", "PUT", f"/drives/{_id(drive_id)}", _body(
            drive_id=drive_id, path_on_host=path_on_host, is_root_device=is_root_device,
            is_read_only=is_read_only, cache_type=cache_type, io_engine=io_engine, partuuid=partuuid))

    def patch_drive(self, drive_id: str, path_on_host: Path) -> None:
        """Swap a drive's backing file after boot (e.g. a restored snapshot's disk)."""
        self.call("patchGuestDriveByID", "PATCH", f"/drives/{_id(drive_id)}",
                  _body(drive_id=drive_id, path_on_host=path_on_host))

    def put_network_interface(self, iface_id: str, host_dev_name: str, *, guest_mac: str | None = None) -> None:
        self.call("putGuestNetworkInterfaceByID", "PUT", f"/network-interfaces/{_id(iface_id)}", _body(
            iface_id=iface_id, host_dev_name=host_dev_name, guest_mac=guest_mac))

    def put_vsock(self, guest_cid: int, uds_path: Path) -> None:
        self.call("putGuestVsock", "PUT", "/vsock", _body(guest_cid=guest_cid, uds_path=uds_path))

    def put_entropy(self) -> None:
        self.call("putEntropyDevice", "PUT", "/entropy", {})

    # -- actions ----------------------------------------------------------------------------------
    def action(self, action: Action) -> None:
        self.call("createSyncAction", "PUT", "/actions", {"action_type": action.value})

    def instance_start(self) -> None:
        self.action(Action.INSTANCE_START)

    def send_ctrl_alt_del(self) -> None:
        self.action(Action.SEND_CTRL_ALT_DEL)

    def flush_metrics(self) -> None:
        self.action(Action.FLUSH_METRICS)

    def pause(self) -> None:
        self.call("patchVm", "PATCH", "/vm", {"state": "Paused"})

    def resume(self) -> None:
        self.call("patchVm", "PATCH", "/vm", {"state": "Resumed"})

    # -- snapshots --------------------------------------------------------------------------------
    def snapshot_create(self, snapshot_path: Path, mem_file_path: Path, *,
                        snapshot_type: SnapshotType = SnapshotType.FULL) -> None:
        self.call("createSnapshot", "PUT", "/snapshot/create", _body(
            snapshot_path=snapshot_path, mem_file_path=mem_file_path, snapshot_type=snapshot_type))

    def snapshot_load(self, snapshot_path: Path, mem_file_path: Path, *, resume_vm: bool = False,
                      track_dirty_pages: bool | None = None,
                      network_overrides: Sequence[NetworkOverride] = (),
                      vsock_uds_path: Path | None = None) -> None:
        # mem_backend (not the deprecated mem_file_path) so the body stays valid on newer versions.
        body = _body(snapshot_path=snapshot_path, resume_vm=resume_vm, track_dirty_pages=track_dirty_pages)
        body["mem_backend"] = {"backend_type": "File", "backend_path": str(mem_file_path)}
        if network_overrides:
            body["network_overrides"] = [{"iface_id": o.iface_id, "host_dev_name": o.host_dev_name}
                                         for o in network_overrides]
        if vsock_uds_path is not None:
            body["vsock_override"] = {"uds_path": str(vsock_uds_path)}
        self.call("loadSnapshot", "PUT", "/snapshot/load", body)


def _id(resource_id: str) -> str:
    # Firecracker accepts only alphanumerics and '_' in ids; catch it here with a clear message.
    if not resource_id or not all(c.isascii() and (c.isalnum() or c == "_") for c in resource_id):
        raise VmmError(f"invalid firecracker resource id {resource_id!r}",
                       hint="ids may contain only letters, digits and '_'")
    return resource_id


def _fault(resp: httpx.Response) -> str:
    try:
        data: Mapping[str, Any] = resp.json()
        return " ".join(str(data.get("fault_message", data)).split())
    except (json.JSONDecodeError, ValueError):
        return resp.text.strip() or resp.reason_phrase or "no error message"
