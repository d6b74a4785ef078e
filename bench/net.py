"""Time to create and to delete one session's network (lease + nftables chains + tap), alone and with 50
other session networks already up: does it grow with the number of sessions?

Runs as root inside a "host" network namespace it creates (never the machine's own network): the outer
process builds the namespaces, then re-runs itself inside with nsenter, where the timing happens in-process.
create = attach_network(); delete = the session's journal unwind (undo of tap, rules, lease + the journal dir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.netns import net_world

from bench.common import report
from dispo.config import Config, NetConfig, NetLink
from dispo.net import attach_network
from dispo.session import transaction


def _one(cfg: Config) -> tuple[float, float]:
    stack = contextlib.ExitStack()
    s = stack.enter_context(transaction(cfg, purpose="bench-net"))
    t0 = time.perf_counter()
    attach_network(s)
    t1 = time.perf_counter()
    stack.close()  # unwinds the journal: tap, rules, lease
    return t1 - t0, time.perf_counter() - t1


def inner(workdir: Path, repeats: int, background: int) -> dict[str, list[float]]:
    cfg = Config(workspace=workdir / "ws", state_dir=workdir / "state", net=NetConfig(link=NetLink.TAP, dns="none"))
    out: dict[str, list[float]] = {}
    _one(cfg)  # warm-up: imports, the first table creation
    pairs = [_one(cfg) for _ in range(repeats)]
    out["alone_create"], out["alone_delete"] = [p[0] for p in pairs], [p[1] for p in pairs]
    with contextlib.ExitStack() as held:
        for _ in range(background):
            attach_network(held.enter_context(transaction(cfg, purpose="bench-net-background")))
        pairs = [_one(cfg) for _ in range(repeats)]
    out["loaded_create"], out["loaded_delete"] = [p[0] for p in pairs], [p[1] for p in pairs]
    return out


def _ms(xs: list[float], q: float) -> str:
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1000:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.net", description=__doc__)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--background", type=int, default=50)
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        result = inner(args.inner, args.repeats, args.background)
        (args.inner / "result.json").write_text(json.dumps(result))
        return 0
    if os.geteuid() != 0:
        print("bench.net needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dispo-bench-net-") as tmp, net_world(Path(tmp), servers=False) as w:
        subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m", "bench.net",
                        "--inner", tmp, "--repeats", str(args.repeats), "--background", str(args.background)],
                       check=True, cwd=Path(__file__).resolve().parent.parent)
        result = json.loads((Path(tmp) / "result.json").read_text())
    rows = []
    for label, key in (("alone (0 other sessions)", "alone"), (f"with {args.background} sessions up", "loaded")):
        c, d = result[f"{key}_create"], result[f"{key}_delete"]
        rows.append((label, len(c), f"{statistics.median(c) * 1000:.1f}", _ms(c, 0.9),
                     f"{statistics.median(d) * 1000:.1f}", _ms(d, 0.9)))
    report("net", ("SCENARIO", "N", "CREATE MEDIAN ms", "CREATE P90 ms", "DELETE MEDIAN ms", "DELETE P90 ms"), rows,
           {"samples_s": result, "link": "tap", "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
