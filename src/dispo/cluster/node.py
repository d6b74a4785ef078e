"""`dispod --ray ADDRESS`: this host joins the Ray cluster as a node (its raylet and its agent).

Never fatal for the node: every failure is said, and dispod keeps serving its own socket, CLI and TCP
listener; the gateway simply does not see the node (a node that is alone is a single host again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispo.cluster.agent import AGENT_PREFIX, NAMESPACE, NodeAgent

log = logging.getLogger(__name__)

# Ray's own smallest object store (about 75 MiB): a node stores nothing in it (its agent answers small dicts).
OBJECT_STORE_BYTES = 78_643_200
JOIN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def import_ray() -> Any:
    """Ray, imported into dispod (a node's driver, the gateway) without its C++ failure signal handler, which
    takes SIGTERM over and kills the process: dispod's own SIGTERM ends its sessions and unwinds first."""
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"  # read once, when Ray is imported
    import ray

    return ray


def ray_env() -> dict[str, str]:
    """Ray's processes: no usage statistics sent out of the cluster."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        from dispo.errors import InvalidInput

        raise InvalidInput(f"--ray {address!r} is not HOST:PORT", hint="give the Ray head's GCS address, e.g. "
                           "--ray 10.0.0.1:6379 (what 'ray start --head' printed)")
    return host.strip("[]"), int(port)


def local_ip_towards(address: str) -> str:
    """This host's address on the route to the Ray head: the address its raylet and driver must both use (left
    to itself, a driver on a host with several raylets may attach to another host's)."""
    host, port = split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: nothing is sent, the kernel only picks the route
        return str(s.getsockname()[0])


def kill_group(pgid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to a process group (`ray start --block` stops its raylet and helpers on it), SIGKILL after."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)


class NodeMember:
    def __init__(self, address: str, node: str, url: str, state_dir: Path, workspace: Path, *,
                 say: Callable[[str], None]) -> None:
        self.address = address
        self.node = node
        self.url = url
        self.dir = state_dir / "ray"  # the raylet's pid file and log: node-local, like the journals
        self.socket = state_dir / "dispod.sock"
        self.templates = workspace / "templates"
        self.say = say
        self.raylet: subprocess.Popen[bytes] | None = None
        self.agent: Any = None
        self.joined = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._join, name="ray-join", daemon=True)

    @property
    def pid_file(self) -> Path:
        return self.dir / "raylet.pgid"

    def start(self) -> None:
        self._thread.start()

    def _join(self) -> None:
        try:
            self._start_raylet()
            self._start_agent()
        except Exception as e:  # the cluster is optional for a node: say it, go on serving
            if not self._stopping.is_set():
                self.say(f"warning: could not join the Ray cluster at {self.address}: {e}; serving this host "
                         "alone (see its log in " + str(self.dir / "raylet.log") + ")")
            return
        self.joined.set()
        self.say(f"joined the Ray cluster at {self.address} as node {self.node}")

    def _start_raylet(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._kill_previous()
        ip = local_ip_towards(self.address)
        self.ip = ip
        argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--address", self.address,
                "--node-ip-address", ip, "--num-cpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
                "--resources", json.dumps({f"dispo-node:{self.node}": 1}), "--disable-usage-stats", "--block"]
        with open(self.dir / "raylet.log", "wb") as out:
            # Its own process group: stopping dispod stops it and everything it started, and a dispod started
            # after a kill -9 finds it by the pgid file.
            self.raylet = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, env=ray_env())
        self.pid_file.write_text(f"{self.raylet.pid}\n")

    def _kill_previous(self) -> None:
        """A raylet that a killed dispod left (kill -9 does not reach its process group)."""
        try:
            pgid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"ray.scripts.scripts" in cmdline:
            kill_group(pgid)
        self.pid_file.unlink(missing_ok=True)

    def _start_agent(self) -> None:
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:  # the raylet registers with the head a few seconds after it started
            try:
                ray.init(address=self.address, namespace=NAMESPACE, _node_ip_address=self.ip, log_to_driver=False,
                         configure_logging=False)
                break
            except Exception:
                if self._stopping.is_set() or time.monotonic() > deadline or self._raylet_gone():
                    raise
                time.sleep(1.0)
        node_id = ray.get_runtime_context().get_node_id()
        remote: Any = ray.remote(NodeAgent)
        while True:  # the name of a previous agent (its dispod was killed) is free once Ray saw its owner die
            try:
                # Not detached: the agent dies with its owner, this dispod, and with the node's raylet.
                self.agent = remote.options(
                    name=AGENT_PREFIX + self.node, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(self.node, self.url, str(self.socket), str(self.templates))
                break
            except ValueError:
                if self._stopping.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        ray.get(self.agent.info.remote(), timeout=max(1.0, deadline - time.monotonic()))

    def _raylet_gone(self) -> bool:
        return self.raylet is None or self.raylet.poll() is not None

    def stop(self) -> None:
        """Leave the cluster: the agent and the driver go, then the raylet's process group."""
        self._stopping.set()
        if self.joined.is_set():
            ray = import_ray()

            with contextlib.suppress(Exception):
                ray.kill(self.agent)
            with contextlib.suppress(Exception):
                ray.shutdown()
        if self.raylet is not None:
            kill_group(self.raylet.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.raylet.wait(5)
            self.pid_file.unlink(missing_ok=True)
