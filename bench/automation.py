"""Automation sessions' lifecycle, in the form public browser benchmarks use: create -> automation connect ->
page loaded -> release, p50 and p95 over N runs, for each way dispo starts the guest, with the host's own
Chromium launched by Playwright (no VM) in the same run as the floor.

    cold       POST /v1/sessions {"profile": "chromium", "automation": true, "start": "cold"}: a boot
    template   the same from the automation template ("start": "warm"; 'dispo template build chromium --automation')
    pool       the same handed a guest of that template waiting in dispod's pool ('chromium+automation=1'); the
               pool refills between runs, outside the figures
    host       /usr/bin/chromium launched by Playwright's chromium.launch() (no VM, no dispod): the floor

Each run, through the SDK on dispod's socket and Playwright for Python over the session's cdp_url:
    create   dispo.Client.session(...) returns (the POST answered: id and cdp_url; the guest is starting)
    connect  chromium.connect_over_cdp(cdp_url) returns (dispod's relay waits until the browser answers)
    loaded   page.goto(URL) returns (its load event; the page comes from the world's "internet" netns)
    release  the client disconnects and Session.end() returns (DELETE ?wait=1: everything gone, receipt clean)
Each phase in seconds from the one before, `total` from the run's start. For the host, create and connect are
one (launch), release is browser.close().

Runs as root inside namespaces it creates (tests/netns.py), dispod in the world's host netns as
tests/dispodworld.py starts it; this process joins that netns, so Playwright and its browsers do too.

    .venv/bin/python -m bench.automation [--runs 3] [--only cold,template,pool,host]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Playwright, sync_playwright
from tests.dispodworld import Dispod, start_dispod, stop_dispod
from tests.netns import DISPO, INTERNET, INTERNET_PORT, NetWorld, net_world
from tests.worlds import loop_fs

import dispo
from bench.common import report
from bench.warm import _enter

PAGE = ('<!doctype html><title>dispo automation bench</title><body style="margin:0"><div style="position:fixed;'
        'inset:0;background:#1e90ff;font:64px sans-serif">dispo automation bench</div>')
URL = f"http://{INTERNET}:{INTERNET_PORT}/bench.html"
HOST_CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 600_000  # a cold browser under TCG takes a while to answer
PHASES = ("create", "connect", "loaded", "release", "total")
MODES = ("cold", "template", "pool", "host")


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the nearest ranks (as numpy's default)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _dispo_run(p: Playwright, d: dispo.Client, start: str) -> dict[str, float]:
    times: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name], t = round(now - t, 3), now

    s = d.session("chromium", automation=True, start=start, url="about:blank")
    try:
        lap("create")
        assert s.cdp_url is not None
        browser = p.chromium.connect_over_cdp(s.cdp_url, timeout=TIMEOUT_MS)
        lap("connect")
        context = browser.contexts[0]
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(URL, timeout=TIMEOUT_MS)
        if page.title() != "dispo automation bench":
            raise SystemExit(f"the page did not load in session {s.id}: {page.title()!r}")
        lap("loaded")
        browser.close()
    finally:
        s.end()
    lap("release")
    if not s.receipt()["clean"]:
        raise SystemExit(f"session {s.id} did not end clean: {s.receipt()}")
    origin = s.status.get("start")
    want = {"cold": "boot", "warm": "restore", "auto": "pool"}[start]
    if origin != want:
        raise SystemExit(f"session {s.id} started by {origin}, not {want}: {s.status.get('start_reason')}")
    times["total"] = round(time.perf_counter() - t0, 3)
    return times


def _host_run(p: Playwright) -> dict[str, float]:
    t0 = time.perf_counter()
    browser = p.chromium.launch(executable_path=HOST_CHROMIUM, timeout=TIMEOUT_MS)
    launched = time.perf_counter()
    page = browser.new_page()
    page.goto(URL, timeout=TIMEOUT_MS)
    loaded = time.perf_counter()
    browser.close()
    end = time.perf_counter()
    return {"create": 0.0, "connect": round(launched - t0, 3), "loaded": round(loaded - launched, 3),
            "release": round(end - loaded, 3), "total": round(end - t0, 3)}


def _pool_ready(d: Dispod) -> None:
    deadline = time.monotonic() + 900
    while True:
        slots = [s for s in d.client.pool()["slots"] if s["name"] == "chromium+automation"]
        if slots and slots[0]["ready"] >= 1:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the pool did not fill: {slots}")
        time.sleep(0.5)


def _said(mode: str, times: dict[str, float]) -> dict[str, float]:
    """Each run as it ends (a long run that is stopped still said what it measured)."""
    print(f"{mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()), flush=True)
    return times


def measure(w: NetWorld, runs: int, modes: list[str]) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    d = start_dispod(w)
    try:
        with sync_playwright() as p, dispo.connect(f"unix:{w.state_dir / 'dispod.sock'}", timeout=120) as client:
            if "host" in modes:
                out["host"] = [_said("host", _host_run(p)) for _ in range(runs)]
            if "cold" in modes:
                out["cold"] = [_said("cold", _dispo_run(p, client, "cold")) for _ in range(runs)]
            if "template" in modes:
                out["template"] = [_said("template", _dispo_run(p, client, "warm")) for _ in range(runs)]
            if "pool" in modes:
                d.client.pool_fill("chromium+automation", 1)
                for _ in range(runs):
                    _pool_ready(d)
                    out["pool"].append(_said("pool", _dispo_run(p, client, "auto")))
                d.client.pool_drain("chromium+automation")
    finally:
        stop_dispod(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(MODES), help="which starts, comma-separated")
    args = ap.parse_args()
    modes = [m for m in MODES if m in args.only.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still tears its world down
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-automation-")))
        w = stack.enter_context(net_world(tmp / "w"))
        w.write_config(link="tap", dns="none")
        # The workspace on btrfs, as a user would have it: session disks and templates are snapshots, not copies.
        stack.enter_context(loop_fs(tmp / "btrfs", "btrfs", "40G"))
        (w.root / "ws").symlink_to(tmp / "btrfs" / "mnt")
        (w.root / "www-inet" / "bench.html").write_text(PAGE)
        subprocess.run([*DISPO, "image", "build", "chromium", "--quiet"], env=w.env(), check=True,
                       capture_output=True, text=True, timeout=3600)
        build_s = 0.0
        if {"template", "pool"} & set(modes):
            t0 = time.perf_counter()
            built = w.dispo("template", "build", "chromium", "--automation", timeout=1800)
            if built.returncode != 0:
                raise SystemExit(f"the automation template did not build: {built.stderr}")
            build_s = time.perf_counter() - t0
            print(f"automation template built in {build_s:.1f} s", flush=True)
        home = _enter(w.host)
        stack.callback(os.close, home)
        runs = measure(w, args.runs, modes)
    rows: list[tuple[Any, ...]] = []
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        summary[mode] = {ph: {"p50": round(statistics.median([r[ph] for r in runs[mode]]), 3),
                              "p95": round(percentile([r[ph] for r in runs[mode]], 95), 3)} for ph in PHASES}
        rows.append((mode, *(f"{summary[mode][ph]['p50']:.2f}/{summary[mode][ph]['p95']:.2f}" for ph in PHASES)))
    report("automation", ("start", *(f"{ph}_p50/p95_s" for ph in PHASES)), rows,
           {"runs": runs, "n": args.runs, "summary": summary, "template_build_s": round(build_s, 1), "url": URL})


if __name__ == "__main__":
    main()
