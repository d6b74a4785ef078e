"""Warm starts: cold boot vs restore from a template vs hand-out from dispod's warm pool, in one process (the
runtime itself, as dispod runs it: no CLI start-up in the figures), median of several runs each.

    A. `-- true` on minimal: time to the guest answering (ready) and to the session's end (command + teardown)
    B. the chromium profile: time to the page visible in the viewer (Playwright on the host, started before the
       session, sees its colour; it polls every half second)
    C. restore time against guest memory (512 MiB .. 4 GiB templates of minimal), and the template's size
    D. memory held by a pooled guest (the VMM's RSS while it waits, paused)

Runs as root inside namespaces it creates (tests/netns.py); the page comes from the world's "internet" netns.

    .venv/bin/python -m bench.warm [--runs 3] [--skip-browser] [--sizes 512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.netns import DISPO, INTERNET, INTERNET_PORT, PYTHON, REPO, NetWorld, net_world
from tests.worlds import loop_fs

from bench.common import ARTIFACTS, median, report
from dispo import config
from dispo.runtime import Event, EventKind, Runtime, build, warm
from dispo.runtime.live import LiveSession
from dispo.runtime.pool import Pool
from dispo.storage.templates import TemplateKind, TemplateStore
from dispo.web.viewers import StandaloneViewers

COLOUR = "1e90ff"
PAGE = (f'<!doctype html><title>bench</title><body style="margin:0"><div style="position:fixed;inset:0;'
        f'background:#{COLOUR};font:64px sans-serif">dispo warm bench</div>')
CLONE_NEWNET = 0x40000000


def _enter(netns: str) -> int:
    """Move this (still single-threaded) process's thread into `netns`; threads made later inherit it."""
    import ctypes

    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
    return home


class Timer:
    """A session's events, with when each arrived."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.at: dict[str, float] = {}
        self.viewer = ""
        self.got_viewer = threading.Event()
        self.steps: dict[str, float] = {}

    def parts(self) -> dict[str, float]:
        """When the viewer URL came and the display showed (seconds from the start), and the steps' times."""
        return {"viewer_url": self.at.get("viewer", 0.0), "display_shown": self.at.get("display_shown", 0.0),
                **self.steps}

    def __call__(self, e: Event) -> None:
        self.at.setdefault(e.kind.value, time.perf_counter() - self.t0)
        if e.kind is EventKind.STEP:
            self.steps[str(e.fields.get("step"))] = float(e.fields.get("seconds", 0.0))
        if e.kind is EventKind.VIEWER:
            self.viewer = str(e.fields.get("url", ""))
            self.got_viewer.set()


def _run(rt: Runtime, request: Any) -> tuple[LiveSession, Timer]:
    timer = Timer()
    live = rt.start(request, sink=timer)
    if not live.wait(900) or live.error is not None:
        raise SystemExit(f"session failed: {live.error}")
    timer.at["end"] = time.perf_counter() - timer.t0
    return live, timer


def _template(rt: Runtime, name: str, **numbers: Any) -> float:
    req, kind = warm.build_request(rt.cfg, name, **numbers)
    t0 = time.perf_counter()
    live = rt.start(req, steps=warm.template_steps(kind, name))
    if not live.wait(1800) or live.error is not None:
        raise SystemExit(f"template {name} failed: {live.error}")
    return time.perf_counter() - t0


def _until(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise SystemExit(why)
        time.sleep(0.1)


def _pool_ready(pool: Pool, name: str, n: int = 1) -> bool:
    slots = pool.status(name)["slots"]
    return bool(slots) and int(slots[0]["ready"]) >= n


def _rss_mib(session_id: str) -> float:
    """RSS of the VMM whose environment names this session (QEMU's carries DISPO_SESSION)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"DISPO_SESSION={session_id}".encode() in env:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return 0.0


class Shot:
    """tests.viewer_shot started ahead (its browser up before the session starts), fed the viewer URL later."""

    def __init__(self, w: NetWorld, out: Path) -> None:
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{w.host}", str(PYTHON), "-m", "tests.viewer_shot",
                                      "-", str(out), COLOUR, "300", "--end"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"viewer_shot did not start: {self.proc.communicate()}")

    def visible(self, timer: Timer) -> float:
        """Seconds from the session's start until the page's colour showed in the viewer; ends the session."""
        if not timer.got_viewer.wait(900):
            raise SystemExit("no viewer URL")
        out, err = self.proc.communicate(timer.viewer + "\n", timeout=400)
        result = json.loads(out.strip().splitlines()[-1]) if self.proc.returncode == 0 else {}
        if not result.get("seen"):
            raise SystemExit(f"the page did not show: {out} {err}")
        started_wall = time.time() - (time.perf_counter() - timer.t0)
        timer.at["display_shown"] = float(result.get("canvas_at", started_wall)) - started_wall
        return float(result["seen_at"]) - started_wall


def part_a(rt: Runtime, pool: Pool, runs: int) -> dict[str, Any]:
    cfg = rt.cfg
    _template(rt, "minimal")
    out: dict[str, list[tuple[float, float]]] = {"cold": [], "restore": [], "pool": []}
    steps: dict[str, list[dict[str, float]]] = {"cold": [], "restore": [], "pool": []}
    for _ in range(runs):
        for how in ("cold", "restore"):
            _, t = _run(rt, build(cfg, image="minimal", command=["true"], start="cold" if how == "cold" else "warm"))
            out[how].append((t.at["ready"], t.at["end"]))
            steps[how].append(t.steps)
    pool.fill("minimal", 1)
    for _ in range(runs):
        _until(lambda: _pool_ready(pool, "minimal"), 300, "the pool did not fill")
        live, t = _run(rt, build(cfg, image="minimal", command=["true"]))
        assert live.status()["start"] == "pool"
        out["pool"].append((t.at["ready"], t.at["end"]))
        steps["pool"].append(t.steps)
    _until(lambda: _pool_ready(pool, "minimal"), 300, "the pool did not fill")
    held = [_rss_mib(s.id) for s in rt.sessions(pooled=True)]
    pool.drain("minimal")
    med = {k: (median([r for r, _ in v]), median([e for _, e in v])) for k, v in out.items()}
    by_step = {k: {name: round(median([run.get(name, 0.0) for run in v]), 3) for name in v[0]} for k, v in steps.items()
               if v}
    return {"median": med, "runs": out, "pooled_rss_mib": held, "steps_median_s": by_step}


def part_b(w: NetWorld, rt: Runtime, pool: Pool, runs: int) -> dict[str, Any]:
    cfg = rt.cfg
    url = f"http://{INTERNET}:{INTERNET_PORT}/bench.html"
    build_s = _template(rt, "chromium")
    out: dict[str, list[float]] = {"cold": [], "restore": [], "pool": []}
    parts: dict[str, list[dict[str, float]]] = {"cold": [], "restore": [], "pool": []}
    for i in range(runs):
        for how in ("cold", "restore"):
            shot = Shot(w, ARTIFACTS / f"bench-warm-{how}-{i + 1}.png")
            timer = Timer()
            live = rt.start(build(cfg, profile="chromium", url=url, start="cold" if how == "cold" else "warm"),
                            sink=timer)
            out[how].append(shot.visible(timer))
            parts[how].append(timer.parts())
            live.wait(300)
    pool.fill("chromium", 1)
    held: list[float] = []
    for i in range(runs):
        _until(lambda: _pool_ready(pool, "chromium"), 600, "the pool did not fill")
        held += [_rss_mib(s.id) for s in rt.sessions(pooled=True)]
        shot = Shot(w, ARTIFACTS / f"bench-warm-pool-{i + 1}.png")
        timer = Timer()
        live = rt.start(build(cfg, profile="chromium", url=url), sink=timer)
        out["pool"].append(shot.visible(timer))
        parts["pool"].append(timer.parts())
        live.wait(300)
    pool.drain("chromium")
    t = TemplateStore(cfg).find(TemplateKind.PROFILE, "chromium")
    by_part = {k: {name: round(median([run.get(name, 0.0) for run in v]), 3) for name in v[0]} for k, v in parts.items()
               if v}
    return {"median": {k: median(v) for k, v in out.items()}, "runs": out, "parts_median_s": by_part,
            "template_build_s": round(build_s, 1),
            "template_mib": round((t.size if t else 0) / 2**20, 1), "pooled_rss_mib": held}


def part_c(rt: Runtime, sizes: list[int], runs: int) -> list[tuple[Any, ...]]:
    rows = []
    for mib in sizes:
        _template(rt, "minimal", memory_mib=mib)
        t = TemplateStore(rt.cfg).find(TemplateKind.IMAGE, "minimal")
        assert t is not None
        memory = sum(int(f["size"]) for n, f in t.files.items() if n not in {"rootfs.ext4", "template.json"})
        ready = []
        for _ in range(runs):
            _, timer = _run(rt, build(rt.cfg, image="minimal", command=["true"], memory_mib=mib, start="warm"))
            ready.append(timer.at["ready"])
        rows.append((mib, round(memory / 2**20, 1), f"{median(ready):.2f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-browser", action="store_true")
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    args = ap.parse_args()
    ARTIFACTS.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still tears its world down
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-warm-")))
        w = stack.enter_context(net_world(tmp / "w"))
        w.write_config(link="tap", dns="none")
        # The workspace on btrfs, as a user would have it: session disks are snapshots, not copies.
        stack.enter_context(loop_fs(tmp / "btrfs", "btrfs", "60G"))
        (w.root / "ws").symlink_to(tmp / "btrfs" / "mnt")
        (w.root / "www-inet" / "bench.html").write_text(PAGE)
        for recipe in ("minimal", *(() if args.skip_browser else ("chromium",))):
            subprocess.run([*DISPO, "image", "build", recipe, "--quiet"], env=w.env(), check=True,
                           capture_output=True, text=True, timeout=3600)
        cfg = config.load(w.config, env=w.env())
        home = _enter(w.host)
        stack.callback(os.close, home)
        rt = Runtime(cfg, viewers=StandaloneViewers(), owner="bench.warm")
        pool = rt.pool = Pool(rt)
        stack.callback(rt.shutdown, "bench over")
        a = part_a(rt, pool, args.runs)
        b = None if args.skip_browser else part_b(w, rt, pool, args.runs)
        c = part_c(rt, [int(s) for s in args.sizes.split(",") if s], args.runs)
        rows: list[tuple[Any, ...]] = []
        cold_ready, cold_end = a["median"]["cold"]
        for how in ("cold", "restore", "pool"):
            ready, end = a["median"][how]
            rows.append(("run -- true", how, f"{ready:.2f}", f"{ready / cold_ready:.3f}", f"{end:.2f}",
                         f"{end / cold_end:.3f}"))
        if b is not None:
            cold = b["median"]["cold"]
            for how in ("cold", "restore", "pool"):
                v = b["median"][how]
                rows.append(("page visible", how, f"{v:.2f}", f"{v / cold:.3f}", "", ""))
        report("warm", ("what", "start", "ready_or_visible_s", "ratio_to_cold", "ended_s", "ended_ratio"), rows,
               {"minimal": a, "chromium": b, "restore_by_memory": c, "runs": args.runs})
        print("restore time against guest memory (template of minimal):")
        for mib, size, ready in c:
            print(f"  {mib:5d} MiB guest: template memory file {size} MiB, restore to ready {ready} s")
        for how, per in a["steps_median_s"].items():
            print(f"  steps of '-- true', {how}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        for how, per in ((b or {}).get("parts_median_s") or {}).items():
            print(f"  chromium page, {how}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        print(f"memory held per pooled guest (VMM RSS, paused): minimal {a['pooled_rss_mib']}"
              + (f", chromium {b['pooled_rss_mib']}" if b else "") + " MiB")


if __name__ == "__main__":
    main()
