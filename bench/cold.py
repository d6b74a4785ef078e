"""A cold `dispo run --image minimal -- true`, phase by phase, for two (or more) source trees side by side.

Each tree runs its own CLI (its .venv) with its own config, state dir and workspace (its own image, built
from its own recipe beforehand: `dispo image build minimal` with the same environment), inside one world of
namespaces (tests/netns.py; `[net] link = "tap"`). The trees alternate run by run, each run holding
/tmp/dispo-vm.lock (the lock every real guest on this machine takes). What is seen, from outside:

    spawn    the VMM's launcher started (a traced Popen whose argv names qemu-system)
    console  the guest's first console line (the session's console.log, read every 20 ms)
    initrd   the kernel hands over to the initramfs ("Run /init as init process")
    init     dispo's init runs (its remount of / read-write: "EXT4-fs (vda): re-mounted")
    network  dispo's init has set up the network ("dispo-init: network")
    sshd     dispo's init says "sshd started"
    ready    the CLI says "ready in"
    cmd      the command ended (the CLI's "command exited" line, or the runtime's supervise returning)
    gone     the CLI exited (the session is torn down, its receipt written)

The tracer (sitecustomize.py, on PYTHONPATH with COLD_TRACE) timestamps every Popen and its exit, and entry and
exit of the functions named in COLD_WRAP. Guest kernel times ([ seconds ] on the console) come along.

    sudo .venv/bin/python -m bench.cold --tree old=/work/wt/old-f8eb89a --tree new=. --runs 3 \
        [--root /var/tmp/cold-bench] [--cache old=/var/tmp/cold-bench/old-cache]

What it showed (issue 23, TCG, 2 rounds of 3 alternating runs, medians of per-run phase lengths in s; the
machine was shared, so absolute figures drift between rounds, the differences held in every round):

    phase                  f8eb89a   main   main + initrd virtio_console
    CLI .. QEMU spawned      1.31    0.60   0.61   (f8eb89a copied the disk: no btrfs pool then)
    QEMU .. initramfs        3.89    3.73   3.75
    initramfs .. init        5.16    4.11   4.67
    init .. ready            4.31    5.99   2.79   (main: the agent's modprobe virtio_console, 1-3.5 s)
    ready .. command ended   1.04    0.57   0.56   (f8eb89a: ssh; now the agent)
    command ended .. gone    0.48    0.11   0.10   (f8eb89a: power button; now SIGKILL)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import net_world

from bench.common import median, report

LOCK = "/tmp/dispo-vm.lock"
PHASES = ("spawn", "console", "initrd", "init", "network", "sshd", "ready", "cmd", "gone")
# Console lines that mark a phase (the first line containing the text).
CONSOLE = (("initrd", "Run /init as init process"), ("init", "re-mounted"), ("network", "dispo-init: network"),
           ("sshd", "sshd started"))
TRACER = '''\
# bench/cold.py's tracer: imported by every Python of a traced run (PYTHONPATH), active with COLD_TRACE.
import os
_out = os.environ.get("COLD_TRACE")
if _out:
    import importlib.abc, importlib.util, subprocess, sys, threading, time
    _lock = threading.Lock()

    def _log(msg):
        with _lock, open(_out, "a") as f:
            f.write(f"{time.time():.4f} {msg}\\n")

    _init = subprocess.Popen.__init__

    def _popen_init(self, args, *a, **kw):
        _init(self, args, *a, **kw)
        words = [str(x) for x in (args if isinstance(args, (list, tuple)) else [args])]
        _log(f"spawn {self.pid} {' '.join(w[:40] for w in words[:14])[:400]}")

    subprocess.Popen.__init__ = _popen_init
    _handle_exit = subprocess.Popen._handle_exitstatus

    def _handle(self, sts, *a, **kw):
        r = _handle_exit(self, sts, *a, **kw)
        _log(f"exit {self.pid} {self.returncode}")
        return r

    subprocess.Popen._handle_exitstatus = _handle
    WRAP = {}
    for spec in os.environ.get("COLD_WRAP", "").split(","):
        if ":" in spec:
            mod, name = spec.split(":")
            WRAP.setdefault(mod, []).append(name)

    def _wrap(mod, qual):
        obj, parts = mod, qual.split(".")
        for p in parts[:-1]:
            obj = getattr(obj, p)
        fn = getattr(obj, parts[-1])

        def w(*a, **kw):
            what = " ".join(repr(x)[:60] for x in a[1:3]) if "." in qual else ""
            _log(f"enter {qual} {what}")
            try:
                return fn(*a, **kw)
            finally:
                _log(f"leave {qual}")
        setattr(obj, parts[-1], w)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in WRAP:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            orig = spec.loader.exec_module

            def exec_module(module):
                orig(module)
                for q in WRAP[name]:
                    try:
                        _wrap(module, q)
                    except AttributeError as e:
                        _log(f"nowrap {name}:{q} {e}")
            spec.loader.exec_module = exec_module
            return spec

    if WRAP:
        sys.meta_path.insert(0, _Finder())
'''
# Functions timed in each tree (those that do not exist in a tree are skipped, logged as nowrap).
WRAP = ",".join((
    "dispo.runtime.steps:supervise", "dispo.runtime.live:LiveSession._dispose", "dispo.runtime.live:LiveSession.emit",
    "dispo.receipt:issue", "dispo.vmm.qemu:QemuVmm.kill", "dispo.vmm.qemu:QemuVmm.stop",
    "dispo.vmm.qemu:QemuVmm._wait_started", "dispo.runtime.machinery:agent_connect",
    "dispo.session:open_session", "dispo.ssh:wait_ready",
))
KERNEL_T = re.compile(r"^\[\s*([0-9.]+)\]")
READY = re.compile(r"session \w+ ready in")


@dataclass
class Tree:
    name: str
    path: Path
    root: Path
    cache: str | None = None

    def env(self, trace: Path) -> dict[str, str]:
        env = dict(os.environ, DISPO_CONFIG=str(self.root / "dispo.toml"), DISPO_STATE_DIR=str(self.root / "state"),
                   DISPO_WORKSPACE=str(self.root / "ws"), PYTHONPATH=str(self.root / "trace"),
                   COLD_TRACE=str(trace), COLD_WRAP=WRAP)
        if self.cache:
            env["DISPO_CACHE_DIR"] = self.cache
        return env


@dataclass
class Run:
    tree: str
    at: dict[str, float] = field(default_factory=dict)   # phase -> seconds since the CLI started
    kernel_init: float | None = None                     # guest kernel time of the hand-over to init
    console: list[tuple[float, str]] = field(default_factory=list)
    stderr: list[tuple[float, str]] = field(default_factory=list)
    trace: list[tuple[float, str]] = field(default_factory=list)
    rc: int | None = None


def _console_path(state: Path) -> Path | None:
    for pattern in ("*/console.log", "*/*/console.log"):
        found = sorted(state.glob(pattern))
        if found:
            return found[0]
    return None


def _watch_console(state: Path, t0: float, out: list[tuple[float, str]], done: threading.Event) -> None:
    path: Path | None = None
    buf, pos = b"", 0
    while not done.is_set():
        if path is None:
            path = _console_path(state)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except OSError:
                data = b""
            pos += len(data)
            buf += data
            now = time.time() - t0
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                out.append((now, line.decode(errors="replace").rstrip("\r")))
        time.sleep(0.02)


def run_once(tree: Tree, netns: str) -> Run:
    trace = tree.root / "trace.log"
    trace.unlink(missing_ok=True)
    r = Run(tree.name)
    argv = ["nsenter", f"--net=/run/netns/{netns}", str(tree.path / ".venv/bin/dispo"), "-v", "run", "--image",
            "minimal", "--", "true"]
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = threading.Event()
        t0 = time.time()
        proc = subprocess.Popen(argv, env=tree.env(trace), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        watcher = threading.Thread(target=_watch_console, args=(tree.root / "state", t0, r.console, done))
        watcher.start()
        assert proc.stderr is not None
        for line in proc.stderr:
            r.stderr.append((time.time() - t0, line.rstrip("\n")))
        r.rc = proc.wait()
        r.at["gone"] = time.time() - t0
        done.set()
        watcher.join()
    for line in trace.read_text().splitlines() if trace.exists() else []:
        t, _, msg = line.partition(" ")
        r.trace.append((float(t) - t0, msg))
    _phases(r)
    return r


def _first(items: list[tuple[float, str]], test: str) -> float | None:
    return next((t for t, s in items if test in s), None)


def _phases(r: Run) -> None:
    spawn = next((t for t, s in r.trace if s.startswith("spawn ") and "qemu-system" in s), None)
    if spawn is not None:
        r.at["spawn"] = spawn
    if r.console:
        r.at["console"] = r.console[0][0]
    for phase, text in CONSOLE:
        if (t := _first(r.console, text)) is not None:
            r.at[phase] = t
    if (line := next((s for _, s in r.console if "as init process" in s), None)) and (m := KERNEL_T.match(line)):
        r.kernel_init = float(m.group(1))
    if (t := next((t for t, s in r.stderr if READY.search(s)), None)) is not None:
        r.at["ready"] = t
    end = _first(r.stderr, "command exited") or next(
        (t for t, s in r.trace if s.startswith("leave supervise")), None)
    if end is not None:
        r.at["cmd"] = end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--cache", action="append", default=[], metavar="NAME=DIR",
                    help="DISPO_CACHE_DIR for a tree (an old tree's image build prunes other builds in its cache)")
    ap.add_argument("--root", type=Path, default=Path("/var/tmp/cold-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dump", type=Path, help="write every run's raw lines (stderr, console, trace) here as JSON")
    args = ap.parse_args()
    caches = dict(c.split("=", 1) for c in args.cache)
    trees = []
    for spec in args.tree:
        name, path = spec.split("=", 1)
        root = args.root / name
        (root / "trace").mkdir(parents=True, exist_ok=True)
        (root / "trace" / "sitecustomize.py").write_text(TRACER)
        if not (root / "dispo.toml").exists():
            (root / "dispo.toml").write_text('[net]\nlink = "tap"\ndns = "none"\n')
        trees.append(Tree(name, Path(path).resolve(), root, caches.get(name)))
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="cold-bench-") as tmp, net_world(Path(tmp) / "w", servers=False) as w:
        for i in range(args.runs):
            for tree in trees if i % 2 == 0 else reversed(trees):
                r = run_once(tree, w.host)
                runs.append(r)
                print(f"run {i + 1} {tree.name}: rc {r.rc} " + " ".join(
                    f"{p} {r.at[p]:.2f}" for p in PHASES if p in r.at) +
                    (f" (guest kernel at initrd {r.kernel_init:.2f})" if r.kernel_init is not None else ""), flush=True)
    rows = []
    for p in PHASES:
        row: list[str] = [p]
        for tree in trees:
            xs = [r.at[p] for r in runs if r.tree == tree.name and p in r.at]
            row.append(f"{median(xs):.2f}" if xs else "-")
        rows.append(tuple(row))
    report("cold", ("phase (s since start)", *(t.name for t in trees)), rows,
           {"runs": [{"tree": r.tree, "at": r.at, "kernel_init": r.kernel_init, "rc": r.rc} for r in runs]})
    if args.dump:
        args.dump.write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
