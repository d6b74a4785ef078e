"""A cluster of dispod nodes on Ray (dispo/cluster/): placement latency (POST /v1/sessions at the gateway ->
201) and the gateway's overhead on a command session (POST -> its `ended` event with the exit status, output
included), each against the same request sent to the node's own dispod directly, side by side in one run.

One node (its own namespace, state dir and a btrfs workspace) behind a gateway, the Ray head and the gateway
in the cluster's namespace (tests/clusterworld.py); real guests (QEMU, TCG here). Runs alternate between the
gateway and the node, so both see the same machine.

    .venv/bin/python -m bench.cluster [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.clusterworld import NET, cluster, start_node, wait_nodes
from tests.netns import DISPO, net_world
from tests.worlds import loop_fs

from bench.common import median, report
from dispo.client import DispodClient

COMMAND = {"image": "minimal", "command": ["sh", "-c", "echo bench; exit 3"]}


def _placed(client: DispodClient) -> float:
    """Seconds from POST to 201 (the session then ended and waited for, outside the time)."""
    t0 = time.perf_counter()
    sid = str(client.create_session({"image": "minimal", "command": ["true"]})["id"])
    took = time.perf_counter() - t0
    client.delete(sid, wait=True)
    return took


def _command(client: DispodClient) -> float:
    """Seconds from POST to the `ended` event of a command session (its output streamed on the way)."""
    t0 = time.perf_counter()
    sid = str(client.create_session(COMMAND)["id"])
    for event in client.events(session=sid):
        if event.kind.value == "ended":
            if event.fields.get("exit_status") != 3:
                raise SystemExit(f"session {sid} ended wrongly: {event.fields}")
            break
    took = time.perf_counter() - t0
    client.delete(sid, wait=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-cluster-")))
        w = stack.enter_context(net_world(tmp / "w", servers=False))
        w.write_config(link="tap", dns="none")
        w.ws = stack.enter_context(loop_fs(tmp / "fs", "btrfs", "12G")) / "ws"
        # In the machine's own namespace: apt reaches the mirror there.
        subprocess.run([*DISPO, "image", "build", "minimal", "--quiet"], env=w.env(), check=True,
                       capture_output=True, timeout=3600)
        c = stack.enter_context(cluster(tmp / "cluster", [w]))
        assert c.gateway is not None
        gateway = c.gateway
        start_node(c, w, "n1", f"{NET}.2", "dispod")
        wait_nodes(c, {"n1"})
        node = stack.enter_context(DispodClient(uds=w.state_dir / "dispod.sock"))
        times: dict[str, list[float]] = {k: [] for k in ("place_gw", "place_node", "cmd_gw", "cmd_node")}
        _command(node)  # a first guest warms the page cache: not counted
        for i in range(args.runs):
            times["place_gw"].append(_placed(gateway))
            times["place_node"].append(_placed(node))
            times["cmd_gw"].append(_command(gateway))
            times["cmd_node"].append(_command(node))
            print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), file=sys.stderr)
        med = {k: round(median(v), 4) for k, v in times.items()}
        rows: list[tuple[Any, ...]] = [
            ("POST -> 201", med["place_gw"], med["place_node"], round(med["place_gw"] / med["place_node"], 2)),
            ("command session POST -> ended", med["cmd_gw"], med["cmd_node"],
             round(med["cmd_gw"] / med["cmd_node"], 3)),
        ]
        report("cluster", ("what", "gateway_s", "node_s", "ratio"), rows,
               {"medians_s": med, "runs": args.runs, "all_s": times,
                "what": "median seconds, gateway (placement through Ray's agents, relay with the cluster secret) "
                        "vs the node's own dispod on its unix socket; one node, real guests"})


if __name__ == "__main__":
    main()
