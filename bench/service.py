"""dispod under load: API create -> guest ready and -> viewer URL (from the event stream), 20 concurrent
POST /v1/sessions against max_sessions (the rest must be 429), and dispod's own memory per live session.

Runs as root inside namespaces it creates (tests/netns.py), never on the machine's own network; real guests
(QEMU, TCG here). Session disks are btrfs snapshots on a loop-mounted btrfs, as a real install has them.

    .venv/bin/python -m bench.service [--runs 3] [--max-sessions 4] [--burst 20] [--no-browser]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.dispodworld import start_dispod, stop_dispod
from tests.netns import DISPO, INTERNET, INTERNET_PORT, net_world
from tests.worlds import loop_fs

from bench.common import median, report
from dispo.client import DispodClient
from dispo.errors import Busy


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _timed_session(client: DispodClient, body: dict[str, Any]) -> dict[str, float]:
    """Seconds from POST to the ready and viewer events; then the session is ended and waited for."""
    t0 = time.time()
    sid = str(client.create_session(body)["id"])
    got: dict[str, float] = {"created_s": time.time() - t0}
    for event in client.events(session=sid):
        if event.kind.value == "ready":
            got["ready_s"] = event.time - t0
            if body.get("command"):
                break
        elif event.kind.value == "viewer":
            got["viewer_s"] = event.time - t0
            break
        elif event.kind.value == "ended":
            raise SystemExit(f"session {sid} ended early: {event.fields}")
    t1 = time.time()
    client.delete(sid, wait=True)
    got["teardown_s"] = time.time() - t1
    return got


def _burst(client: DispodClient, n: int) -> dict[str, Any]:
    body = {"image": "minimal", "command": ["sleep", "600"]}

    def post(_: int) -> str:
        try:
            return str(client.create_session(body)["id"])
        except Busy:
            return "429"

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(post, range(n)))
    accepted = [a for a in answers if a != "429"]
    return {"posted": n, "created_201": len(accepted), "refused_429": answers.count("429"), "ids": accepted}


def _wait_running(client: DispodClient, ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while any(client.session(i)["state"] != "running" for i in ids):
        if time.monotonic() > deadline:
            raise SystemExit("sessions did not reach running")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-sessions", type=int, default=4)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true", help="skip the chromium runs (create -> viewer URL)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-service-")))
        w = stack.enter_context(net_world(tmp / "w"))
        w.write_config(link="tap", dns="none")
        env = w.env()
        env["DISPO_WORKSPACE"] = str(stack.enter_context(loop_fs(tmp / "fs", "btrfs", "12G")) / "ws")
        recipes = ("minimal",) if args.no_browser else ("minimal", "chromium")
        for recipe in recipes:  # in the machine's own namespace: apt reaches the mirror there
            subprocess.run([*DISPO, "image", "build", recipe, "--quiet"], env=env, check=True, capture_output=True,
                           timeout=3600)
        (w.root / "www-inet" / "page.html").write_text("<!doctype html><body style='background:#1e90ff'>bench")
        d = start_dispod(w, "dispod", "--max-sessions", str(args.max_sessions), env=env)
        proc, client = d.proc, d.client
        try:
            rows: list[tuple[Any, ...]] = []
            runs: dict[str, list[dict[str, float]]] = {"minimal -- true": [], "chromium URL": []}
            for i in range(args.runs):
                runs["minimal -- true"].append(_timed_session(client, {"image": "minimal", "command": ["true"]}))
                if not args.no_browser:
                    runs["chromium URL"].append(_timed_session(client, {
                        "profile": "chromium", "url": f"http://{INTERNET}:{INTERNET_PORT}/page.html"}))
                print(f"run {i + 1}: {[r[-1] for r in runs.values() if r]}", file=sys.stderr)
            medians: dict[str, dict[str, float]] = {}
            for what, results in runs.items():
                if not results:
                    continue
                med = {k: round(median([r[k] for r in results if k in r]), 2)
                       for k in ("created_s", "ready_s", "viewer_s", "teardown_s") if any(k in r for r in results)}
                medians[what] = med
                rows.append((what, med.get("created_s", "-"), med.get("ready_s", "-"), med.get("viewer_s", "-"),
                             med.get("teardown_s", "-")))
            idle_rss = _rss_kib(proc.pid)
            burst = _burst(client, args.burst)
            _wait_running(client, burst["ids"])
            busy_rss = _rss_kib(proc.pid)
            per_session_kib = (busy_rss - idle_rss) / max(1, burst["created_201"])
            for sid in burst["ids"]:
                client.delete(sid)
            for sid in burst["ids"]:
                client.delete(sid, wait=True)
            rows.append((f"burst of {burst['posted']} POSTs", f"{burst['created_201']} x 201",
                         f"{burst['refused_429']} x 429", "-", "-"))
            rows.append(("dispod RSS", f"{idle_rss / 1024:.1f} MiB idle", f"{busy_rss / 1024:.1f} MiB busy",
                         f"{per_session_kib / 1024:.2f} MiB/session", "-"))
            report("service", ("what", "created_s", "ready_s", "viewer_s", "teardown_s"), rows,
                   {"medians": medians, "burst": {k: v for k, v in burst.items() if k != "ids"},
                    "dispod_rss_kib": {"idle": idle_rss, "busy": busy_rss, "per_session": round(per_session_kib)},
                    "max_sessions": args.max_sessions, "runs": args.runs,
                    "what": "times from POST /v1/sessions to the ready and viewer events (dispod's clock); "
                            "QEMU under whatever accelerator dispo probes"})
        finally:
            stop_dispod(d)


if __name__ == "__main__":
    main()
