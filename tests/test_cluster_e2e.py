"""Many hosts on Ray, end to end (dispo/cluster/, docs/scale-out.md): a Ray head and the gateway in a namespace
of their own, two nodes (dispod --ray, max_sessions = 1 each), each in its own test world (tests/netns.py: its
host namespace, state dir and workspace), the three joined by a bridge; real QEMU/TCG guests of the minimal image.

Placement (one session per node, the third 429), the merged list with global ids (`dispo ls` through the
gateway), the relay of a session's token URL to the node holding it, a lost node (kill -9 of its dispod and
its Ray processes: its session ends "node lost", the other goes on, a new session lands on the survivor and its
output and exit status come back through the gateway), and the lost node's dispod started again: it reclaims
what its session left (its listing equals the one before) and rejoins.
"""

from __future__ import annotations

import base64
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

import pytest

from dispo.client import DispodClient
from dispo.errors import Busy, Conflict, NotFound
from tests.guests import GuestImages, guest_world, state_listing
from tests.netns import NetWorld, in_ns, sh
from tests.tiers import tier

pytestmark = [pytest.mark.root, pytest.mark.vm]

pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[test,cluster]' (scripts/dev setup does)")

NET = "10.77.0"
HEAD = f"{NET}.1"
RAY_PORT = 6379
API_PORT = 8686
LOST_WITHIN_S = 60


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
        sock = tmp_path / "gw-state" / "gateway" / "dispod.sock"
        deadline = time.monotonic() + 120
        while True:
            if sock.exists():
                client = DispodClient(uds=sock)
                with contextlib.suppress(Exception):
                    client.health()
                    c.gateway = client
                    break
                client.close()
            assert all(p.poll() is None for p in c.procs), (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.3)
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


def start_node(c: Cluster, w: NetWorld, name: str, ip: str, log_name: str) -> Node:
    """dispod --ray in the world's host namespace; returns once it said it joined the cluster."""
    log = w.root / f"{log_name}.log"
    argv = ["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-m", "dispo.daemon.main",
            "--listen", f"{ip}:{API_PORT}", "--ray", c.address, "--node", name]
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
    found["state"] = [p for p in found["state"] if not str(p).startswith("ray")]  # type: ignore[union-attr]
    return found


def kill_node(n: Node) -> None:
    """kill -9 of the node's dispod and of every Ray process its raylet's group holds."""
    pgid = int((n.w.state_dir / "ray" / "raylet.pgid").read_text())
    os.kill(n.proc.pid, signal.SIGKILL)  # nsenter exec()s python: this is dispod itself
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    n.proc.wait(30)


@pytest.fixture
@tier("vm")
def worlds(tmp_path: Path, guest_images: GuestImages) -> Iterator[tuple[NetWorld, NetWorld]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, taps, nftables")
    with guest_world(tmp_path / "a", guest_images, "minimal") as a, \
            guest_world(tmp_path / "b", guest_images, "minimal") as b:
        yield a, b


def test_two_nodes_behind_a_gateway_and_a_lost_node(worlds: tuple[NetWorld, NetWorld], tmp_path: Path) -> None:
    wa, wb = worlds
    before = {"a": node_listing(wa), "b": node_listing(wb)}
    with cluster(tmp_path / "cluster", [wa, wb]) as c:
        gw = c.gateway
        assert gw is not None
        na = start_node(c, wa, "na", f"{NET}.2", "dispod-a")
        nb = start_node(c, wb, "nb", f"{NET}.3", "dispod-b")
        wait_nodes(c, {"na", "nb"})

        # One session per node (max_sessions = 1 each), then no room: 429 with the reason.
        first = gw.create_session({"image": "minimal", "command": ["sleep", "600"]})
        second = gw.create_session({"image": "minimal", "command": ["sleep", "600"]})
        ids = {str(first["id"]), str(second["id"])}
        assert {i.partition("~")[0] for i in ids} == {"na", "nb"}, ids
        with pytest.raises(Busy, match="max_sessions"):
            gw.create_session({"image": "minimal", "command": ["true"]})
        on = {i.partition("~")[0]: i for i in ids}
        for gid in ids:
            wait_running(c, gid)

        # `dispo ls` through the gateway (its TCP address and token, from inside the cluster's namespace).
        ls = subprocess.run(["nsenter", f"--net=/run/netns/{c.ns}", sys.executable, "-m", "dispo", "--dispod",
                             c.url, "ls"], env={**wa.env(), "DISPO_TOKEN": c.token}, capture_output=True,
                            text=True, timeout=60, check=False)
        assert ls.returncode == 0, ls.stderr
        assert {line.split()[0] for line in ls.stdout.splitlines()[1:]} == ids, ls.stdout
        assert all("running" in line for line in ls.stdout.splitlines()[1:]), ls.stdout

        # Everything about a session goes to the node that holds it (the same local id under the other node's
        # name is unknown there), its viewer paths too: the node checks the token (this one is wrong).
        with pytest.raises(Conflict, match=f"session {on['na']} has no viewer"):  # na's answer, ids made global
            gw.tokens(on["na"])
        with pytest.raises(NotFound):
            gw.session(f"nb~{on['na'].partition('~')[2]}")
        status, body = http_get(c.ns, f"{c.url}/viewer/{on['na']}/{'x' * 43}/")
        assert status == 403 and "viewer link is not valid" in body and on["na"] in body, (status, body)
        status, body = http_get(c.ns, f"{c.url}/viewer/zz~{on['na'].partition('~')[2]}/{'x' * 43}/")
        assert status == 404 and "no node zz" in body, (status, body)

        # The lost node: kill -9 of nb's dispod and its Ray processes.
        kill_node(nb)
        deadline = time.monotonic() + LOST_WITHIN_S
        while (lost := gw.session(on["nb"]))["state"] != "ended":
            assert time.monotonic() < deadline, lost
            time.sleep(0.5)
        assert lost["end_reason"] == "node lost" and lost["end_kind"] == "node_lost", lost
        assert gw.session(on["na"])["state"] == "running"
        assert "nb" in gw.health()["lost_nodes"]

        # A new session lands on the survivor once it has room; a command's output and exit status come back.
        gw.delete(on["na"], wait=True)
        made = gw.create_session({"image": "minimal", "command": ["sh", "-c", "echo hello from na; exit 7"]})
        gid = str(made["id"])
        assert gid.startswith("na~"), made
        out = b""
        ended: dict[str, object] = {}
        for event in gw.events(session=gid):
            if event.kind.value == "output":
                out += base64.b64decode(str(event.fields["data"]))
            if event.kind.value == "ended":
                ended = dict(event.fields)
        assert out == b"hello from na\n" and ended["exit_status"] == 7, (out, ended)
        assert gw.session(gid)["exit_status"] == 7

        # nb's dispod again: it reclaims what its session left and rejoins.
        nb = start_node(c, wb, "nb", f"{NET}.3", "dispod-b2")
        assert node_listing(wb) == before["b"]
        wait_nodes(c, {"na", "nb"})
        assert "nb" not in gw.health()["lost_nodes"]
        for n in (na, nb):
            os.kill(n.proc.pid, signal.SIGTERM)
            assert n.proc.wait(120) == 0, n.log.read_text()
    assert node_listing(wa) == before["a"]
    assert node_listing(wb) == before["b"]
