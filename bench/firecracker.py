"""Firecracker lifecycle timings with the real binary and the tiny ELF guest (medians over N runs).

- start: from the start request (process spawn) to InstanceStart returning (configure included)
- console: from the start request to the guest's line on the serial console
- stop: from the stop request to everything removed (graceful: the guest handles Ctrl-Alt-Del)
- snapshot create: pause + full snapshot of a 64 MiB guest
- snapshot load: from spawning a fresh process to snapshot/load (resume) returning
- jailed start / stop: the same through the jailer, when a matching jailer pair is installed
- raw start / raw snapshot load: the same binary driven directly (spawn, wait for its socket, the same
  configuration requests over plain HTTP, InstanceStart; or spawn and snapshot/load), no dispo in between: the
  floor dispo's figures are compared with ("ratio to raw" in the table and the JSON)

`--baseline TREE` measures another checkout's dispo (e.g. /work/main) in the same run (its rows are prefixed
"baseline"), so before and after come from the same machine and load.

Runs as root; everything lives in a temp dir and a network namespace, removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.fcworld import (
    GUEST_LINE,
    firecracker_or_skip_reason,
    inside_new_netns,
    jailer_pair_or_skip_reason,
    make_tap,
    tiny_elf,
)
from tests.worlds import make_config, make_ext4

from bench.common import median, report
from dispo.infra.txn import transaction
from dispo.vmm.base import MachineSpec, NetAttachment
from dispo.vmm.firecracker.jailer import JailSpec
from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm

MEM_MIB = 64


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.unix_path))


def _raw_spawn(binary: Path, cwd: Path) -> tuple[subprocess.Popen[bytes], _UnixHTTP]:
    sock = cwd / "raw.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen([str(binary), "--api-sock", str(sock), "--id", "raw"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.0002)
        finally:
            probe.close()
    return proc, _UnixHTTP(sock)


def _put(conn: _UnixHTTP, path: str, body: dict[str, Any]) -> None:
    conn.request("PUT", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status >= 300:
        raise SystemExit(f"raw firecracker: PUT {path}: {resp.status} {data!r}")


def raw_start(binary: Path, tmp: Path, tap: str) -> float:
    """The binary alone: spawn, socket, machine, kernel, disk, NIC, InstanceStart."""
    t0 = time.perf_counter()
    proc, conn = _raw_spawn(binary, tmp)
    try:
        _put(conn, "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB})
        _put(conn, "/boot-source", {"kernel_image_path": str(tmp / "vmlinux"), "boot_args": "console=ttyS0"})
        _put(conn, "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(tmp / "disk.ext4"),
                                      "is_root_device": True, "is_read_only": False})
        _put(conn, "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap,
                                                "guest_mac": "06:00:ac:14:00:06"})
        _put(conn, "/actions", {"action_type": "InstanceStart"})
        return time.perf_counter() - t0
    finally:
        conn.close()
        proc.kill()
        proc.wait()


def raw_load(binary: Path, cwd: Path, state: Path, mem: Path) -> float:
    """The binary alone: spawn, socket, snapshot/load with resume."""
    t0 = time.perf_counter()
    proc, conn = _raw_spawn(binary, cwd)
    try:
        _put(conn, "/snapshot/load", {"snapshot_path": str(state), "resume_vm": True,
                                      "mem_backend": {"backend_type": "File", "backend_path": str(mem)}})
        return time.perf_counter() - t0
    finally:
        conn.close()
        proc.kill()
        proc.wait()


def one_run(cfg: Any, tmp: Path, opts: FirecrackerOptions, *, snapshot: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    kernel, disk = tmp / "vmlinux", tmp / "disk.ext4"
    with transaction(cfg, purpose="bench") as s:
        tap = make_tap(f"dsp-{s.session_id}")
        spec = MachineSpec(s.session_id, kernel, disk, s.state_path, cmdline=("console=ttyS0",),
                           memory_mib=MEM_MIB, nets=(NetAttachment(tap, "06:00:ac:14:00:06"),))
        vmm = FirecrackerVmm(spec, opts)
        t0 = time.perf_counter()
        vmm.start(s.journal)
        out["start"] = time.perf_counter() - t0
        while GUEST_LINE not in spec.console_log.read_bytes():
            time.sleep(0.0005)
        out["console"] = time.perf_counter() - t0
        if snapshot:
            t0 = time.perf_counter()
            snap = vmm.snapshot(s.state_path / "snap")
            out["snapshot create"] = time.perf_counter() - t0
            vmm.stop(timeout=3)
            vmm = FirecrackerVmm(spec, opts)
            t0 = time.perf_counter()
            vmm.restore(s.journal, snap, resume=True)
            out["snapshot load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        vmm.stop(timeout=10)
        out["stop"] = time.perf_counter() - t0
        if snapshot and opts.jail is None:
            # The same binary, the same guest and tap, without dispo: alternating with dispo's, run for run.
            out["raw start"] = raw_start(opts.binary, tmp, tap)
            out["raw snapshot load"] = raw_load(opts.binary, spec.workdir, snap.state, snap.mem)
    return out


def series(cfg: Any, tmp: Path, opts: FirecrackerOptions, runs: int, *, snapshot: bool) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for _ in range(runs):
        for k, v in one_run(cfg, tmp, opts, snapshot=snapshot).items():
            results.setdefault(k, []).append(v)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.firecracker", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--baseline", type=Path, metavar="TREE", help="also measure the dispo of this checkout")
    ap.add_argument("--raw-json", type=Path, help=argparse.SUPPRESS)  # a --baseline child writes its samples here
    args = ap.parse_args(argv)
    fc, why = firecracker_or_skip_reason()
    if fc is None:
        print(f"bench.firecracker: skipped: {why}", file=sys.stderr)
        return 0
    rows: list[tuple[Any, ...]] = []
    raw: dict[str, Any] = {}

    def add_rows(prefix: str, results: dict[str, list[float]]) -> None:
        for k, v in results.items():
            ratio = ""
            if k in ("start", "snapshot load") and f"raw {k}" in results:
                ratio = f"{median(v) / median(results[f'raw {k}']):.2f}"
            rows.append((f"{prefix}{k}", f"{median(v) * 1000:.1f}", f"{min(v) * 1000:.1f}", f"{max(v) * 1000:.1f}",
                         len(v), ratio))

    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="dfb-base-") as d:
            out = Path(d) / "baseline.json"
            env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve() / "src")}
            subprocess.run([sys.executable, "-m", "bench.firecracker", "--runs", str(args.runs), "--raw-json",
                            str(out)], check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
            raw["baseline"] = json.loads(out.read_text())
            add_rows("baseline ", raw["baseline"])
    with tempfile.TemporaryDirectory(prefix="dfb-", dir="/tmp") as d, inside_new_netns("dspbench"):
        tmp = Path(d)
        tiny_elf(tmp / "vmlinux")
        make_ext4(tmp / "disk.ext4", "16M")
        cfg = make_config(tmp / "ws", tmp / "st")
        plain = series(cfg, tmp, FirecrackerOptions(binary=fc), args.runs, snapshot=True)
        if args.raw_json:
            args.raw_json.write_text(json.dumps(plain))
            return 0
        raw["plain"] = plain
        add_rows("", plain)
        pair, jwhy = jailer_pair_or_skip_reason()
        if pair is not None:
            jail = JailSpec(jailer=pair[0], firecracker=pair[1], chroot_base=tmp / "j", memory_limit_mib=512,
                            cpu_quota=1.0)
            jailed = series(cfg, tmp, FirecrackerOptions(binary=pair[1], jail=jail), args.runs, snapshot=True)
            raw["jailed"] = jailed
            add_rows("jailed ", jailed)
        else:
            print(f"bench.firecracker: jailer skipped: {jwhy}", file=sys.stderr)
    versions = {"firecracker": str(fc)}
    report("firecracker", ("step", "median ms", "min ms", "max ms", "runs", "ratio to raw"), rows,
           {"raw_seconds": raw, "binaries": versions, "guest_mem_mib": MEM_MIB,
            "baseline": str(args.baseline) if args.baseline else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
