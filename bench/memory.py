"""Memory of restored clones, and teardown of a restored session: what N clones of one template add together.

    A. N clones (1, then 4 by default) of the `minimal` template restored and alive at once, each running
       `sleep`: each clone's VMM PSS and RSS (/proc/PID/smaps_rollup) once all are ready and settled, and their
       sum; PSS counts a page shared by k processes as 1/k to each, so the sum is what the clones hold together.
    B. Teardown of a restored `-- true` session on minimal (the receipt's teardown_s: from the command's end
       until every object is removed), median of several.
    C. (--browser) A for the `chromium` profile's template.

Runs as root inside namespaces it creates (tests/netns.py), the runtime in this process, as bench/warm.py does.

    .venv/bin/python -m bench.memory [--clones 1,4] [--runs 5] [--settle 3] [--browser]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.netns import DISPO, net_world
from tests.worlds import loop_fs

from bench.common import ARTIFACTS, median, report
from bench.warm import _enter, _template
from dispo import config
from dispo.runtime import Event, EventKind, Runtime, build
from dispo.runtime.live import LiveSession
from dispo.web.viewers import StandaloneViewers


class Ready:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, e: Event) -> None:
        if e.kind is EventKind.READY:
            self.event.set()


def vmm_pid(session_id: str) -> int | None:
    """The VMM whose environment names this session (QEMU's carries DISPO_SESSION)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if f"DISPO_SESSION={session_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    return None


def rollup(pid: int) -> dict[str, float]:
    """Rss, Pss and their parts (MiB) of one process, from smaps_rollup."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB":
            out[key.strip()] = round(int(fields[0]) / 1024, 1)
    return out


def parts(pid: int, guest_mib: int) -> dict[str, float]:
    """Where a VMM's memory is (MiB, smaps): the guest's RAM mapping (its PSS, and the pages it holds privately:
    copied on write, or all of them when the RAM is anonymous) and TCG's translation cache (the rwx mapping)."""
    out = {"guest_ram_pss": 0.0, "guest_ram_private": 0.0, "tcg_cache_rss": 0.0}
    cur: dict[str, int] = {}
    kind = ""

    def close() -> None:
        if kind == "ram":
            out["guest_ram_pss"] += cur.get("Pss", 0) / 1024
            out["guest_ram_private"] += (cur.get("Private_Clean", 0) + cur.get("Private_Dirty", 0)
                                         if cur.get("Anonymous", 0) == cur.get("Rss", 0) else cur.get("Anonymous", 0)
                                         ) / 1024
        elif kind == "tcg":
            out["tcg_cache_rss"] += cur.get("Rss", 0) / 1024

    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        f = line.split()
        if f and "-" in f[0] and not f[0].endswith(":"):
            close()
            cur, size = {}, 0
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            size = (hi - lo) >> 20
            name = f[5] if len(f) > 5 else ""
            kind = ("tcg" if f[1] == "rwxp" and not name else
                    "ram" if size == guest_mib and f[1].startswith("rw") else "")
        elif len(f) == 3 and f[2] == "kB":
            cur[f[0].rstrip(":")] = int(f[1])
    close()
    return {k: round(v, 1) for k, v in out.items()}


def shared_ram_mib(pid: int) -> float:
    """What the template's sealed RAM memfd a clone maps holds (MiB allocated; once for all clones), 0 if none."""
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{n}").startswith("/memfd:dispo-ram-"):
                return round(os.stat(f"/proc/{pid}/fd/{n}").st_blocks * 512 / 2**20, 1)
    return 0.0


def clones(rt: Runtime, n: int, settle: float, **req: Any) -> dict[str, Any]:
    """n clones up at once (each started when the one before is ready: sharing is between live clones)."""
    lives: list[LiveSession] = []
    guest_mib = 0
    try:
        for _ in range(n):
            ready = Ready()
            request = build(rt.cfg, start="warm", **req)
            guest_mib = request.memory_mib
            live = rt.start(request, sink=ready)
            lives.append(live)
            if not ready.event.wait(900) or live.error is not None:
                raise SystemExit(f"clone failed: {live.error}")
        time.sleep(settle)  # the command runs, the guest settles
        per = []
        memfd = 0.0
        for live in lives:
            pid = vmm_pid(live.id)
            if pid is None:
                raise SystemExit(f"no VMM for {live.id}: {live.status()} {live.error}")
            per.append({**rollup(pid), **parts(pid, guest_mib)})
            memfd = shared_ram_mib(pid)
    finally:
        for live in lives:
            live.stop("bench over")
        for live in lives:
            live.wait(300)
    return {"clones": n, "per_clone": per, "pss_mib": [p.get("Pss", 0.0) for p in per],
            "rss_mib": [p.get("Rss", 0.0) for p in per], "pss_sum_mib": round(sum(p.get("Pss", 0.0) for p in per), 1),
            "rss_sum_mib": round(sum(p.get("Rss", 0.0) for p in per), 1),
            # the template's RAM in one sealed memfd (shmem), counted in PSS only for the pages clones map
            "shared_memfd_mib": memfd}


def teardown(rt: Runtime, runs: int) -> dict[str, Any]:
    out = []
    restore = []
    for _ in range(runs):
        seen: list[Event] = []
        live = rt.start(build(rt.cfg, image="minimal", command=["true"], start="warm"), sink=seen.append)
        if not live.wait(900) or live.error is not None or live.receipt is None:
            raise SystemExit(f"session failed: {live.error}")
        out.append(round(float(live.receipt.teardown_s or 0.0), 3))
        restore.append(next((float(e.fields.get("seconds", 0.0)) for e in seen
                             if e.kind is EventKind.STEP and e.fields.get("step") == "vmm.restore"), 0.0))
    # vmm.restore alone (no clone alive: the first clone of a template also fills its memfd)
    return {"runs": out, "median_s": median(out), "vmm_restore_s": restore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clones", default="1,4")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--browser", action="store_true")
    ap.add_argument("--only-browser", action="store_true", help="the chromium clones alone (no minimal)")
    args = ap.parse_args()
    ARTIFACTS.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still tears its world down
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-memory-")))
        w = stack.enter_context(net_world(tmp / "w"))
        w.write_config(link="tap", dns="none")
        stack.enter_context(loop_fs(tmp / "btrfs", "btrfs", "40G"))
        (w.root / "ws").symlink_to(tmp / "btrfs" / "mnt")
        for recipe in ("minimal", *(("chromium",) if args.browser or args.only_browser else ())):
            subprocess.run([*DISPO, "image", "build", recipe, "--quiet"], env=w.env(), check=True,
                           capture_output=True, text=True, timeout=3600)
        cfg = config.load(w.config, env=w.env())
        home = _enter(w.host)
        stack.callback(os.close, home)
        rt = Runtime(cfg, viewers=StandaloneViewers(), owner="bench.memory")
        stack.callback(rt.shutdown, "bench over")
        counts = [int(c) for c in args.clones.split(",")]
        results: dict[str, Any] = {}
        if not args.only_browser:
            _template(rt, "minimal")
            results["minimal"] = [clones(rt, n, args.settle, image="minimal", command=["sleep", "600"])
                                  for n in counts]
            results["teardown"] = teardown(rt, args.runs)
        if args.browser or args.only_browser:
            _template(rt, "chromium")
            results["chromium"] = [clones(rt, n, args.settle * 4, profile="chromium", url="about:blank")
                                   for n in counts]
        rows: list[tuple[Any, ...]] = []
        for what in ("minimal", "chromium"):
            for r in results.get(what, []):
                each = r["per_clone"]
                rows.append((what, r["clones"], " ".join(f"{v:.0f}" for v in r["pss_mib"]),
                             " ".join(f"{v:.0f}" for v in r["rss_mib"]), r["pss_sum_mib"], r["rss_sum_mib"],
                             r["shared_memfd_mib"], " ".join(f"{p['guest_ram_pss']:.0f}" for p in each),
                             " ".join(f"{p['guest_ram_private']:.0f}" for p in each),
                             " ".join(f"{p['tcg_cache_rss']:.0f}" for p in each)))
        report("memory", ("template", "clones", "pss_mib_each", "rss_mib_each", "pss_sum_mib", "rss_sum_mib",
                          "shared_memfd_mib", "guest_ram_pss_each", "guest_ram_private_each", "tcg_cache_each"), rows,
               {**results, "settle_s": args.settle})
        if "teardown" in results:
            print(f"teardown of a restored minimal session: median {results['teardown']['median_s']:.3f} s "
                  f"(runs {results['teardown']['runs']})")


if __name__ == "__main__":
    main()
