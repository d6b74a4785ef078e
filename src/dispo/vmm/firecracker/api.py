"""A small typed client for Firecracker's REST API on its unix socket.

Each method is one API operation (named after the spec's operationId) and builds the JSON body from
keyword arguments, leaving out what is None so Firecracker's defaults apply. Every request passes through
`on_request` first: the tests hook it to validate each body against the published OpenAPI spec, so the
client cannot drift from the contract unnoticed.

The requests go over one kept HTTP/1.1 connection (http.client on the unix socket): a start makes eight
of them back to back, and httpx's client costs more than a millisecond of Python per request on a loaded host,
several times what Firecracker takes to answer. Tests hand in an httpx transport (MockTransport) instead; it gets
the same bytes. Firecracker answers `HTTP/1.1 204 ` (empty reason phrase) and errors as 400 +
{"fault_message": ...}, which becomes ApiError naming the operation.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket as socketlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispo.errors import ApiError, ApiUnreachable, VmmError

if TYPE_CHECKING:  # only the tests' stand-in transport is an httpx one
    import httpx

Json = dict[str, Any]
log = logging.getLogger(__name__)
MAX_ANSWER = 1 << 20  # bytes of one answer; Firecracker's largest (the full VM config) is a few KiB


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


class _UnixConnection(http.client.HTTPConnection):
    """http.client's connection on a unix socket (the host name only fills the Host header)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM | socketlib.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.unix_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class _Answer:
    status: int
    content: bytes
    reason: str


class FirecrackerApi:
    def __init__(self, socket: Path, *, timeout: float = 10.0,
                 on_request: Callable[[Request], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.socket = socket
        self.on_request = on_request
        self._conn = _UnixConnection(socket, timeout)
        self._lock = threading.Lock()  # one connection: one request at a time on it
        self._stand_in: httpx.Client | None = None
        if transport is not None:
            import httpx  # the tests' path only: the real one never imports httpx

            self._stand_in = httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout,
                                          trust_env=False)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self._stand_in is not None:
            self._stand_in.close()

    def __enter__(self) -> FirecrackerApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------
    def call(self, operation: str, method: str, path: str, body: Json | None = None) -> Json | None:
        req = Request(operation, method, path, body)
        content = json.dumps(body).encode() if body is not None else None
        log.debug("firecracker API %s: %s %s %s", operation, method, path, content.decode() if content else "")
        if self.on_request is not None:
            self.on_request(req)
        try:
            answer = self._send(method, path, content)
        except (OSError, http.client.HTTPException) as e:
            raise ApiUnreachable(f"firecracker API socket {self.socket} did not answer {operation}: "
                                 f"{str(e) or type(e).__name__}") from None
        if 200 <= answer.status < 300:
            return json.loads(answer.content) if answer.content else None
        raise ApiError(operation, method, path, answer.status, _fault(answer))

    def ping(self) -> bool:
        """True if something answers on the socket (used while waiting for a fresh process)."""
        try:
            self._send("GET", "/", None)
        except (OSError, http.client.HTTPException):
            return False
        return True

    def _send(self, method: str, path: str, content: bytes | None) -> _Answer:
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if self._stand_in is not None:
            import httpx  # the tests' path only: the real one never imports httpx

            try:
                got = self._stand_in.request(method, path, content=content, headers=headers)
            except httpx.TransportError as e:
                raise OSError(str(e)) from None
            return _Answer(got.status_code, got.content, got.reason_phrase)
        with self._lock:
            conn = self._conn
            if conn.sock is not None:
                idle = select.poll()  # not select(): dispod's descriptors go past FD_SETSIZE
                idle.register(conn.sock, select.POLLIN)
                if idle.poll(0):
                    conn.close()  # readable while idle: Firecracker closed it (or sent what was never asked for)
            try:
                conn.request(method, path, content, headers)
                resp = conn.getresponse()
                data = resp.read(MAX_ANSWER + 1)  # capped while read: the VMM runs the guest's code paths
                if len(data) > MAX_ANSWER:
                    conn.close()
                    raise ApiUnreachable(f"firecracker API socket {self.socket} answered more than {MAX_ANSWER} bytes "
                                         f"to {method} {path}")
            except BaseException:
                conn.close()  # the next request starts on a fresh connection
                raise
            if resp.will_close:
                conn.close()
            return _Answer(resp.status, data, resp.reason)

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


def _fault(answer: _Answer) -> str:
    try:
        data = json.loads(answer.content)
        return " ".join(str(data.get("fault_message", data) if isinstance(data, dict) else data).split())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return answer.content.decode(errors="replace").strip() or answer.reason or "no error message"
