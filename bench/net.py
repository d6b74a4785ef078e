"""Time to create and to delete one session's network (lease + nftables chains + tap), alone and with 50
other session networks already up: does it grow with the number of sessions?

Runs as root inside a "host" network namespace it creates (never the machine's own network): the outer
process builds the namespaces, then re-runs itself inside with nsenter, where the timing happens in-process.
create = attach_network(); delete = the session's journal unwind (undo of tap, rules, lease + the journal dir).

`--baseline TREE` measures another checkout's dispo (e.g. /work/main) in the same run, alternating rounds with
this one, so before/after figures come from the same machine under the same load. The kernel's own floor is
measured too: a bare tap made and deleted with the same system calls, nothing else.

Then what a live session costs: `missing_rules()` (the supervisor's check that the session's firewall is still
there) with 1 and with 51 sessions' rules in the table, and the guest's traffic through its rules and NAT (a
veth stand-in guest: TCP bulk send to the "internet" namespace, UDP request/response round trips), so a change
of the per-packet rules shows up here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.netns import INTERNET, net_world

from bench.common import report
from dispo.config import Config, NetConfig, NetLink
from dispo.infra.txn import transaction
from dispo.net import attach_network, missing_rules

TCP_PORT, UDP_PORT = 5201, 5202
TRAFFIC_MIB, UDP_ROUNDS, WATCH_CALLS = 512, 2000, 30

# In the "internet" namespace: a TCP sink (reads to EOF, then closes) and a UDP echo.
SINK = r'''
import socket, sys, threading
host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def echo():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((host, uport))
    while True:
        data, addr = u.recvfrom(64)
        u.sendto(data, addr)
threading.Thread(target=echo, daemon=True).start()
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((host, tport))
t.listen()
while True:
    c, _ = t.accept()
    while c.recv(1 << 20):
        pass
    c.close()
'''

# In the guest's (stand-in's) namespace: through the session's rules and NAT to the sink.
CLIENT = r'''
import json, socket, sys, time
host, tport, uport, mib, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, tport), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
buf = bytes(1 << 20)
t0 = time.perf_counter()
for _ in range(mib):
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
s.recv(1)
tcp_s = time.perf_counter() - t0
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.connect((host, uport))
rtts = []
for _ in range(rounds):
    t = time.perf_counter()
    u.send(b"x")
    u.recv(16)
    rtts.append(time.perf_counter() - t)
print(json.dumps({"tcp_s": tcp_s, "rtts": rtts}))
'''


def _one(cfg: Config) -> tuple[float, float]:
    stack = contextlib.ExitStack()
    s = stack.enter_context(transaction(cfg, purpose="bench-net"))
    t0 = time.perf_counter()
    attach_network(s)
    t1 = time.perf_counter()
    stack.close()  # unwinds the journal: tap, rules, lease
    return t1 - t0, time.perf_counter() - t1


def _kernel_floor(repeats: int) -> tuple[list[float], list[float]]:
    """A bare persistent tap made (ioctls) and deleted (one rtnetlink request): what the kernel itself costs."""
    import fcntl
    import socket
    import struct
    make, delete = [], []
    name = "dspbenchfloor"
    for _ in range(repeats):
        t0 = time.perf_counter()
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), 0x1002))  # TUNSETIFF tap, no_pi
        fcntl.ioctl(fd, 0x400454CB, 1)  # TUNSETPERSIST
        os.close(fd)
        t1 = time.perf_counter()
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            attr = struct.pack("=HH", 4 + len(name) + 1, 3) + name.encode() + b"\0"
            attr += b"\0" * (-len(attr) % 4)
            body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attr
            nl.send(struct.pack("=IHHII", 16 + len(body), 17, 0x5, 1, 0) + body)  # RTM_DELLINK, request+ack
            nl.recv(4096)
        delete.append(time.perf_counter() - t1)
        make.append(t1 - t0)
    return make, delete


def inner(workdir: Path, repeats: int, background: int, live: bool = True) -> dict[str, list[float]]:
    cfg = Config(workspace=workdir / "ws", state_dir=workdir / "state", net=NetConfig(link=NetLink.TAP, dns="none"))
    out: dict[str, list[float]] = {}
    _one(cfg)  # warm-up: imports, the first table creation
    pairs = [_one(cfg) for _ in range(repeats)]
    out["alone_create"], out["alone_delete"] = [p[0] for p in pairs], [p[1] for p in pairs]
    with contextlib.ExitStack() as held:
        sids = [attach_network(held.enter_context(transaction(cfg, purpose="bench-net-background"))).session_id
                for _ in range(background)]
        pairs = [_one(cfg) for _ in range(repeats)]
        out["kernel_create"], out["kernel_delete"] = _kernel_floor(repeats)
        out["watch_loaded"] = _watch(cfg, sids[0]) if sids and live else []
    out["loaded_create"], out["loaded_delete"] = [p[0] for p in pairs], [p[1] for p in pairs]
    if not live:
        return out
    standin = dataclasses.replace(cfg, net=NetConfig(link=NetLink.VETH_STANDIN, dns="none"))
    with transaction(standin, purpose="bench-net-traffic") as s:
        gn = attach_network(s)
        out["watch_alone"] = _watch(cfg, gn.session_id)
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{gn.standin_netns}", sys.executable, "-c", CLIENT,
                               INTERNET, str(TCP_PORT), str(UDP_PORT), str(TRAFFIC_MIB), str(UDP_ROUNDS)],
                              capture_output=True, text=True, check=True, timeout=300)
        traffic = json.loads(proc.stdout)
    out["tcp_s"], out["udp_rtt"] = [traffic["tcp_s"]], traffic["rtts"]
    return out


def _watch(cfg: Config, sid: str) -> list[float]:
    times = []
    for _ in range(WATCH_CALLS):
        t0 = time.perf_counter()
        assert missing_rules(cfg.state_dir, sid) == []
        times.append(time.perf_counter() - t0)
    return times


def _ms(xs: list[float], q: float) -> str:
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1000:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.net", description=__doc__)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--background", type=int, default=50)
    ap.add_argument("--baseline", type=Path, metavar="TREE",
                    help="also measure the dispo of this checkout (e.g. /work/main), alternating with this one")
    ap.add_argument("--rounds", type=int, default=2, help="with --baseline: rounds of each, alternating")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-live", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        result = inner(args.inner, args.repeats, args.background, live=not args.no_live)
        (args.inner / "result.json").write_text(json.dumps(result))
        return 0
    if os.geteuid() != 0:
        print("bench.net needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    here = Path(__file__).resolve().parent.parent
    variants: list[tuple[str, Path]] = [("this tree", here)]
    if args.baseline:
        variants.insert(0, ("baseline", args.baseline.resolve()))
    rounds = args.rounds if args.baseline else 1
    per_variant: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dispo-bench-net-") as tmp, net_world(Path(tmp), servers=False) as w:
        w.spawn(["nsenter", f"--net=/run/netns/{w.internet}", sys.executable, "-c", SINK, INTERNET, str(TCP_PORT),
                 str(UDP_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(rounds):
            for label, tree in variants:
                work = Path(tmp) / f"{label.replace(' ', '-')}-{r}"
                work.mkdir()
                # The bench and its helpers come from this tree (the working directory); dispo from `tree`.
                env = {**os.environ, "PYTHONPATH": str(tree / "src")}
                with_live = label == "this tree" and r == rounds - 1
                subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m", "bench.net",
                                "--inner", str(work), "--repeats", str(args.repeats),
                                "--background", str(args.background), *([] if with_live else ["--no-live"])],
                               check=True, cwd=here, env=env)
                got = json.loads((work / "result.json").read_text())
                into = per_variant.setdefault(label, {})
                for key, xs in got.items():
                    into.setdefault(key, []).extend(xs)
    result = per_variant["this tree"]
    if args.baseline:
        base = per_variant["baseline"]
        cmp_rows: list[tuple[Any, ...]] = []
        for key, label in (("loaded_create", "create"), ("loaded_delete", "delete")):
            b, n = statistics.median(base[key]) * 1000, statistics.median(result[key]) * 1000
            cmp_rows.append((f"{label}, {args.background} sessions up", len(result[key]), f"{b:.1f}", f"{n:.1f}",
                             f"{n / b:.2f}"))
        cmp_rows.append(("kernel floor: bare tap make + delete", len(result["kernel_create"]), "-",
                     f"{statistics.median(result['kernel_create']) * 1000:.1f} + "
                     f"{statistics.median(result['kernel_delete']) * 1000:.1f}", "-"))
        report("net-compare", ("STEP", "N", f"BASELINE ({args.baseline}) MEDIAN ms", "THIS TREE MEDIAN ms",
                               "RATIO"), cmp_rows,
               {"samples_s": {"baseline": base, "this_tree": result}, "baseline": str(args.baseline),
                "rounds": rounds, "background": args.background, "cpus": os.cpu_count()})
    rows: list[tuple[Any, ...]] = []
    for label, key in (("alone (0 other sessions)", "alone"), (f"with {args.background} sessions up", "loaded")):
        c, d = result[f"{key}_create"], result[f"{key}_delete"]
        rows.append((label, len(c), f"{statistics.median(c) * 1000:.1f}", _ms(c, 0.9),
                     f"{statistics.median(d) * 1000:.1f}", _ms(d, 0.9)))
    c, d = result["kernel_create"], result["kernel_delete"]
    rows.append(("kernel floor: a bare tap", len(c), f"{statistics.median(c) * 1000:.1f}", _ms(c, 0.9),
                 f"{statistics.median(d) * 1000:.1f}", _ms(d, 0.9)))
    report("net", ("SCENARIO", "N", "CREATE MEDIAN ms", "CREATE P90 ms", "DELETE MEDIAN ms", "DELETE P90 ms"), rows,
           {"samples_s": result, "link": "tap", "cpus": os.cpu_count()})
    def ms(xs: list[float]) -> tuple[int, str, str]:
        return len(xs), f"{statistics.median(xs) * 1000:.1f} ms", f"{_ms(xs, 0.9)} ms"

    live = [("missing_rules(), 1 session", *ms(result["watch_alone"]))]
    if result.get("watch_loaded"):
        live.append((f"missing_rules(), {args.background + 1} sessions", *ms(result["watch_loaded"])))
    rtt = sorted(result["udp_rtt"])
    live += [("guest -> internet TCP, MiB/s", 1, f"{TRAFFIC_MIB / result['tcp_s'][0]:.0f}", "-"),
             ("guest -> internet UDP round trip", len(rtt), f"{statistics.median(rtt) * 1e6:.0f} us",
              f"{rtt[int(0.9 * len(rtt))] * 1e6:.0f} us")]
    report("net-live", ("LIVE SESSION", "N", "MEDIAN", "P90"), live, {"link": "veth-standin", "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
