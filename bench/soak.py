"""Soak: N sessions back to back through one Runtime in this process; after each, count what is left on the
host (`dispo verify`'s scan: journals, disks, taps, chains, leases, processes), this process's open file
descriptors and its memory (RSS), and the receipt's cost. All should stay 0 and flat.

    .venv/bin/python -m bench.soak [--sessions 200] [--real]

Default: the fake machinery (tests/fakes.py: a real journal, disk copy, gated processes and receipt; no
guest), which isolates the runtime's own leaks. --real: real guests (QEMU, TCG here) in namespaces the
benchmark creates (tests/netns.py), never on the machine's own network.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median, report
from dispo import config, verify
from dispo.config import Config
from dispo.runtime import Runtime, build
from dispo.runtime.machinery import REAL, Machinery


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _soak(cfg: Config, machinery: Machinery, n: int) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    rt = Runtime(cfg, machinery=machinery)
    rows: list[tuple[Any, ...]] = []
    fds0, rss0 = _fds(), _rss_kib()
    leaked_total, dirty, check_s, total_s = 0, 0, [], []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        live = rt.start(build(cfg, command=["true"]))
        if not live.wait(600):
            raise SystemExit(f"session {i} did not end")
        total_s.append(time.perf_counter() - t0)
        if live.exit_status != 0 or live.receipt is None:
            raise SystemExit(f"session {i} failed: {live.status()}")
        dirty += 0 if live.receipt.clean else 1
        check_s.append(live.receipt.check_s)
        left = verify.scan(cfg).orphans
        leaked_total += len(left)
        if i == 1 or i % max(1, n // 8) == 0 or i == n:
            rows.append((i, len(left), _fds() - fds0, f"{(_rss_kib() - rss0) / 1024:.1f}",
                         f"{median(check_s) * 1000:.2f}", f"{median(total_s):.3f}"))
    extra = {"sessions": n, "leaked_objects_total": leaked_total, "receipts_not_clean": dirty,
             "fd_growth": _fds() - fds0, "rss_growth_mib": round((_rss_kib() - rss0) / 1024, 1),
             "receipt_check_ms_median": round(median(check_s) * 1000, 2),
             "session_s_median": round(median(total_s), 3), "max_rss_mib": resource.getrusage(
                 resource.RUSAGE_SELF).ru_maxrss // 1024, "machinery": machinery.name}
    return rows, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--real", action="store_true", help="real guests (slow under TCG: about 6 s a session)")
    args = ap.parse_args()
    header = ("after", "leaked_objects", "fd_growth", "rss_growth_mib", "receipt_check_ms", "session_s")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-soak-")))
        if args.real:
            from tests.netns import DISPO, net_world
            from tests.worlds import loop_fs

            w = stack.enter_context(net_world(tmp / "w"))
            w.write_config(link="tap", dns="none")
            ws = stack.enter_context(loop_fs(tmp / "fs", "btrfs", "4G")) / "ws"
            env = {**w.env(), "DISPO_WORKSPACE": str(ws)}
            import subprocess

            subprocess.run([*DISPO, "image", "build", "minimal", "--quiet"], env=env, check=True, timeout=3600,
                           capture_output=True)
            cfg = config.load(w.config, env=env)
            from pyroute2 import netns  # type: ignore[import-untyped]

            netns.setns(w.host)  # this process joins the world's host namespace: its sessions live there
            rows, extra = _soak(cfg, REAL, args.sessions)
        else:
            from tests import fakes

            cfg = fakes.config(tmp)
            rows, extra = _soak(cfg, fakes.machinery(), args.sessions)
        report("soak", header, rows, extra)


if __name__ == "__main__":
    main()
