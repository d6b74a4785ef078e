"""Firecracker lifecycle timings with the real binary and the tiny ELF guest (medians over N runs).

- start: from the start request (process spawn) to InstanceStart returning (configure included)
- console: from the start request to the guest's line on the serial console
- stop: from the stop request to everything removed (graceful: the guest handles Ctrl-Alt-Del)
- snapshot create: pause + full snapshot of a 64 MiB guest
- snapshot load: from spawning a fresh process to snapshot/load (resume) returning
- jailed start / stop: the same through the jailer, when a matching jailer pair is installed

Runs as root; everything lives in a temp dir and a network namespace, removed at the end.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)
    fc, why = firecracker_or_skip_reason()
    if fc is None:
        print(f"bench.firecracker: skipped: {why}", file=sys.stderr)
        return 0
    rows: list[tuple[Any, ...]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dfb-", dir="/tmp") as d, inside_new_netns("dspbench"):
        tmp = Path(d)
        tiny_elf(tmp / "vmlinux")
        make_ext4(tmp / "disk.ext4", "16M")
        cfg = make_config(tmp / "ws", tmp / "st")
        plain = series(cfg, tmp, FirecrackerOptions(binary=fc), args.runs, snapshot=True)
        raw["plain"] = plain
        for k, v in plain.items():
            rows.append((f"{k}", f"{median(v) * 1000:.1f}", f"{min(v) * 1000:.1f}", f"{max(v) * 1000:.1f}", len(v)))
        pair, jwhy = jailer_pair_or_skip_reason()
        if pair is not None:
            jail = JailSpec(jailer=pair[0], firecracker=pair[1], chroot_base=tmp / "j", memory_limit_mib=512,
                            cpu_quota=1.0)
            jailed = series(cfg, tmp, FirecrackerOptions(binary=pair[1], jail=jail), args.runs, snapshot=True)
            raw["jailed"] = jailed
            for k, v in jailed.items():
                rows.append((f"jailed {k}", f"{median(v) * 1000:.1f}", f"{min(v) * 1000:.1f}",
                             f"{max(v) * 1000:.1f}", len(v)))
        else:
            print(f"bench.firecracker: jailer skipped: {jwhy}", file=sys.stderr)
    versions = {"firecracker": str(fc)}
    report("firecracker", ("step", "median ms", "min ms", "max ms", "runs"), rows,
           {"raw_seconds": raw, "binaries": versions, "guest_mem_mib": MEM_MIB})
    return 0


if __name__ == "__main__":
    sys.exit(main())
