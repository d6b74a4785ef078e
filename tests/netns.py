"""Network-namespace worlds for networking tests: nothing here touches the machine's own network.

    internet netns  (wan0 203.0.113.2/24, lo 10.99.0.1/32 = a "private" address out there, lo 192.0.2.10/32
                     = another public one, HTTP :8080)
        |  veth
    host netns      (up0 203.0.113.1/24, default route via 203.0.113.2; lan0 198.51.100.1/24 (a veth to nowhere);
                     ip_forward=1; HTTP :8081 = a host service guests must not reach). dispo runs here.
        |  dsp-<id>  (a tap, or with net.link = "veth-standin" a veth into ...)
    dispo-vmstandin-<id> netns  (eth0 = the guest's NIC, created and removed by dispo: a VM stand-in)

Every namespace name carries a random per-world suffix; `net_world()` deletes them all, kills the servers
and any dispo it started, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The code under test is the one the running interpreter imports (never a fixed .venv path).
PYTHON = Path(sys.executable)
DISPO = [sys.executable, "-m", "dispo"]

HOST_UP = "203.0.113.1"  # host side of the host <-> internet link (the NAT address)
INTERNET = "203.0.113.2"  # the "internet" HTTP server
INTERNET_PRIVATE = "10.99.0.1"  # a private address in the internet netns
INTERNET_OTHER = "192.0.2.10"  # another public address in the internet netns
HOST_LAN = "198.51.100.1"  # the host's address on another interface
INTERNET_PORT = 8080
HOST_PORT = 8081
PAGE = "hello from the internet netns\n"

_FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    body = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()\n"
    "except OSError as e:\n"
    "    print(type(e).__name__, e, file=sys.stderr); sys.exit(7)\n"
    "sys.stdout.write(body.decode())\n"
)


def sh(*argv: str | Path, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def in_ns(ns: str, *argv: str | Path, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # nsenter changes only the network namespace (ip netns exec also unshares mounts, which would hide
    # the namespaces dispo creates from everyone else).
    return sh("nsenter", f"--net=/run/netns/{ns}", *argv, check=check, timeout=timeout)


def netns_list() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()}


def fetch(ns: str, url: str, timeout: float = 5.0) -> str | None:
    """Body of url fetched from inside netns `ns`, or None if the connection failed."""
    proc = in_ns(ns, sys.executable, "-c", _FETCH, url, str(timeout), check=False, timeout=timeout + 10)
    return proc.stdout if proc.returncode == 0 else None


def dispo_links(ns: str) -> set[str]:
    links = json.loads(in_ns(ns, "ip", "-j", "link", "show").stdout)
    return {str(link["ifname"]) for link in links if str(link["ifname"]).startswith("dsp-")}


def nft_ruleset(ns: str) -> str:
    return in_ns(ns, "nft", "list", "ruleset").stdout


@dataclass
class NetWorld:
    suffix: str
    root: Path  # scratch directory: config, state dir, workspace, server files
    host: str = ""
    internet: str = ""
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    # The workspace, when not root/ws: tests/guests.py puts it on the test run's image store (a btrfs).
    ws: Path | None = None

    @property
    def workspace(self) -> Path:
        return self.ws or self.root / "ws"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Path:
        return self.root / "dispo.toml"

    def write_config(self, **net: str | int) -> None:
        lines = ["[net]"] + [f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in net.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        return dict(os.environ, DISPO_CONFIG=str(self.config), DISPO_STATE_DIR=str(self.state_dir),
                    DISPO_WORKSPACE=str(self.workspace))

    def dispo_argv(self, *args: str | Path) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.host}", *DISPO, *(str(a) for a in args)]

    def dispo(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.dispo_argv(*args), capture_output=True, text=True, env=self.env(),
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    def spawn(self, argv: Sequence[str | Path], **kw: object) -> subprocess.Popen[str]:
        p: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            [str(a) for a in argv], text=True, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def hold(self, name: str, *extra: str | Path) -> Held:
        """`dispo net run` holding a session network until release(); its env is read from a file."""
        envfile = self.root / f"{name}.env"
        gofile = self.root / f"{name}.go"
        script = f'env | grep ^DISPO_ > "{envfile}.tmp"; mv "{envfile}.tmp" "{envfile}"; ' \
                 f'while [ ! -e "{gofile}" ]; do sleep 0.05; done'
        proc = self.spawn(self.dispo_argv("net", "run", "--name", name, *extra, "--", "sh", "-c", script),
                          env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Held(name, proc, envfile, gofile)

    def standin_netns(self) -> set[str]:
        return {n for n in netns_list() if n.startswith("dispo-vmstandin-")}


@dataclass
class Held:
    name: str
    proc: subprocess.Popen[str]
    envfile: Path
    gofile: Path
    vars: dict[str, str] = field(default_factory=dict)

    def wait_ready(self, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while not self.envfile.exists():
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"dispo net run {self.name} exited {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dispo net run {self.name} not ready after {timeout} s")
            time.sleep(0.02)
        self.vars = dict(line.split("=", 1) for line in self.envfile.read_text().splitlines() if "=" in line)
        return self.vars

    def release(self, timeout: float = 30) -> tuple[int, str]:
        self.gofile.touch()
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    @property
    def sid(self) -> str:
        return self.vars["DISPO_SESSION"]

    @property
    def guest_ns(self) -> str:
        return self.vars["DISPO_GUEST_NETNS"]


def _serve(world: NetWorld, ns: str, port: int, directory: Path, log: Path) -> None:
    p = world.spawn(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "http.server", "-b", "0.0.0.0",  # noqa: S104 - inside a test netns
                     str(port), "-d", str(directory)], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 10
    while fetch(ns, f"http://127.0.0.1:{port}/index.txt", 1) is None:
        if p.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"HTTP server in {ns} did not start: {log.read_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def net_world(root: Path, *, servers: bool = True) -> Iterator[NetWorld]:
    """Build host + internet namespaces (and HTTP servers); tear everything down whatever happens."""
    w = NetWorld(secrets.token_hex(3), root)
    root.mkdir(parents=True, exist_ok=True)
    w.host, w.internet = f"dsptest-host-{w.suffix}", f"dsptest-inet-{w.suffix}"
    standins_before = w.standin_netns()
    try:
        sh("ip", "netns", "add", w.host)
        sh("ip", "netns", "add", w.internet)
        sh("ip", "-n", w.host, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", w.internet)
        for ns, cmds in (
            (w.host, [["link", "set", "lo", "up"], ["addr", "add", f"{HOST_UP}/24", "dev", "up0"],
                      ["link", "set", "up0", "up"], ["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
                      ["addr", "add", f"{HOST_LAN}/24", "dev", "lan0"], ["link", "set", "lan0", "up"],
                      ["route", "add", "default", "via", INTERNET]]),
            (w.internet, [["link", "set", "lo", "up"], ["addr", "add", f"{INTERNET}/24", "dev", "wan0"],
                          ["addr", "add", f"{INTERNET_PRIVATE}/32", "dev", "lo"],
                          ["addr", "add", f"{INTERNET_OTHER}/32", "dev", "lo"], ["link", "set", "wan0", "up"],
                          ["route", "add", "198.51.100.0/24", "via", HOST_UP]]),
        ):
            for c in cmds:
                sh("ip", "-n", ns, *c)
        in_ns(w.host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        w.write_config(link="veth-standin", dns="none")
        if servers:
            for name, ns, port in (("inet", w.internet, INTERNET_PORT), ("host", w.host, HOST_PORT)):
                d = root / f"www-{name}"
                d.mkdir()
                (d / "index.txt").write_text(PAGE if name == "inet" else "host service\n")
                _serve(w, ns, port, d, root / f"http-{name}.log")
        yield w
    finally:
        for p in w.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.communicate(timeout=10)
        # Stand-ins of this world's sessions only: other tests running at the same time have theirs.
        for ns in {n for n in w.standin_netns() - standins_before if _standin_of(n, w)} | {w.host, w.internet}:
            sh("ip", "netns", "del", ns, check=False)


def _standin_of(ns: str, w: NetWorld) -> bool:
    """True if stand-in namespace `ns` was made by a session of a state dir of this world (dispo marks its
    loopback with "dispo session <id> state <state dir or its hash>")."""
    from dispo.net.links import owner_tag

    proc = sh("ip", "-n", ns, "-j", "link", "show", "dev", "lo", check=False)
    try:
        alias = str(json.loads(proc.stdout)[0].get("ifalias", "")) if proc.returncode == 0 else ""
    except (ValueError, IndexError):
        return False
    state = alias.partition(" state ")[2]
    return bool(state) and (state.startswith(f"{w.root}/") or state == owner_tag(w.state_dir))
