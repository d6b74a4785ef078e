"""A cluster of dispod nodes on Ray in test worlds (dispo/cluster/, docs/scale-out.md), shared by
tests/test_cluster_e2e.py and bench/cluster.py: the cluster's own namespace (a bridge to each node world's host
namespace), the Ray head and the gateway in it, nodes started with dispod --ray; everything it starts, Ray's
processes included (in their own process groups, in other namespaces: `ray stop` would not see them), is killed
at the end whatever happens."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dispo.client import DispodClient
from tests.dispodworld import wait_answering
from tests.guests import state_listing
from tests.netns import NetWorld, in_ns, sh

NET = "10.77.0"
HEAD = f"{NET}.1"
RAY_PORT = 6379
API_PORT = 8686


@dataclass
class Cluster:
    ns: str
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    gateway: DispodClient | None = None
    token: str = ""

    @property
    def address(self) -> str:
        return f"{HEAD}:{RAY_PORT}"

    @property
    def url(self) -> str:
        return f"http://{HEAD}:{API_PORT}"

    def spawn(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, text=True, stdin=subprocess.DEVNULL, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append(p)
        return p


def _ray_groups(tmp: Path) -> list[int]:
    """Process groups of Ray's processes that this test's Ray started: their command lines name its temp dir
    or were started by its `ray start` (their environment carries RAY_TMPDIR)."""
    groups = set()
    mark = f"RAY_TMPDIR={tmp}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                groups.add(os.getpgid(int(pid)))
    return sorted(groups)


@contextlib.contextmanager
def cluster(tmp_path: Path, nodes: list[NetWorld]) -> Iterator[Cluster]:
    """The cluster's own namespace (a bridge, one veth into each node's host namespace), the Ray head and the
    gateway in it; every process of Ray's and dispo's that it started killed at the end, whatever happens."""
    ns = f"dsptest-clu-{secrets.token_hex(3)}"
    ray_tmp = Path(f"/tmp/dsp-ray-{secrets.token_hex(3)}")  # short: Ray's unix socket paths live under it
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "cluster.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
    os.close(fd)
    gw_config = tmp_path / "gateway.toml"
    gw_config.write_text(f'[cluster]\nsecret_file = "{secret}"\n')
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    c = Cluster(ns, tmp_path, env)
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "addr", "add", f"{HEAD}/24", "dev", "br0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        for i, w in enumerate(nodes, start=2):
            sh("ip", "-n", ns, "link", "add", f"n{i}", "type", "veth", "peer", "name", "clu0", "netns", w.host)
            sh("ip", "-n", ns, "link", "set", f"n{i}", "master", "br0")
            sh("ip", "-n", ns, "link", "set", f"n{i}", "up")
            sh("ip", "-n", w.host, "addr", "add", f"{NET}.{i}/24", "dev", "clu0")
            sh("ip", "-n", w.host, "link", "set", "clu0", "up")
            with w.config.open("a") as f:
                f.write(f'[service]\nmax_sessions = 1\n[cluster]\nsecret_file = "{secret}"\n')
        # Ray kept light: no dashboard, no CPUs to schedule on (the agents ask for none), the smallest store.
        c.spawn(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                 "--node-ip-address", HEAD, "--port", str(RAY_PORT), "--num-cpus", "0", "--include-dashboard=false",
                 "--object-store-memory", "78643200", "--disable-usage-stats", "--block"],
                tmp_path / "ray-head.log", env)
        gw_env = dict(env, DISPO_CONFIG=str(gw_config), DISPO_STATE_DIR=str(tmp_path / "gw-state"))
        c.spawn(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "dispo.daemon.main", "--gateway",
                 "--ray", c.address, "--listen", f"{HEAD}:{API_PORT}"], tmp_path / "gateway.log", gw_env)
        c.gateway = wait_answering(tmp_path / "gw-state" / "gateway" / "dispod.sock", c.procs,
                                   tmp_path / "gateway.log", timeout=120)
        c.token = (tmp_path / "gw-state" / "gateway" / "dispod.token").read_text().strip()
        yield c
    finally:
        if c.gateway is not None:
            c.gateway.close()
        for p in c.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for _ in range(3):  # raylets and workers the nodes started (in their own process groups)
            for g in _ray_groups(ray_tmp):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(g, signal.SIGKILL)
            time.sleep(0.5)
        for p in c.procs:
            with contextlib.suppress(Exception):
                p.wait(10)
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)


_GET = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=10); print(r.status); print(r.read().decode())\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code); print(e.read().decode())\n"
)


def http_get(ns: str, url: str) -> tuple[int, str]:
    """(status, body) of GET url from inside namespace `ns`."""
    out = in_ns(ns, sys.executable, "-c", _GET, url, timeout=30).stdout
    status, _, body = out.partition("\n")
    return int(status), body


@dataclass
class Node:
    name: str
    w: NetWorld
    proc: subprocess.Popen[str]
    log: Path


def start_node(c: Cluster, w: NetWorld, name: str, ip: str, log_name: str, *extra: str) -> Node:
    """dispod --ray in the world's host namespace; returns once it said it joined the cluster."""
    log = w.root / f"{log_name}.log"
    argv = ["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m", "dispo.daemon.main",
            "--listen", f"{ip}:{API_PORT}", "--ray", c.address, "--node", name, *extra]
    proc = w.spawn(argv, env={**w.env(), **c.env}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "joined the Ray cluster" not in log.read_text():
        assert proc.poll() is None and "could not join" not in log.read_text(), log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)
    return Node(name, w, proc, log)


def wait_nodes(c: Cluster, names: set[str], timeout: float = 60) -> None:
    assert c.gateway is not None
    deadline = time.monotonic() + timeout
    while {n["node"] for n in c.gateway.health()["nodes"]} != names:
        assert time.monotonic() < deadline, c.gateway.health()
        time.sleep(0.5)


def wait_running(c: Cluster, gid: str, timeout: float = 300) -> None:
    assert c.gateway is not None
    deadline = time.monotonic() + timeout
    while (s := c.gateway.session(gid))["state"] != "running":
        assert s["state"] != "ended" and time.monotonic() < deadline, s
        time.sleep(0.3)


def node_listing(w: NetWorld) -> dict[str, object]:
    """state_listing without the node's Ray files (they live as long as its dispod, like dispod.token)."""
    found = state_listing(w)
    state = found["state"]
    assert isinstance(state, list)
    found["state"] = [p for p in state if not str(p).startswith("ray")]
    return found


def kill_node(n: Node) -> None:
    """kill -9 of the node's dispod and of every Ray process its raylet's group holds."""
    pgid = int((n.w.state_dir / "ray" / "raylet.pgid").read_text())
    os.kill(n.proc.pid, signal.SIGKILL)  # nsenter exec()s python: this is dispod itself
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    n.proc.wait(30)
