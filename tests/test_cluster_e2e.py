"""Many hosts on Ray, end to end (dispo/cluster/, docs/scale-out.md): a Ray head and the gateway in a namespace
of their own, two nodes (dispod --ray, max_sessions = 1 each), each in its own test world (tests/netns.py: its
host namespace, state dir and workspace), the three joined by a bridge; real QEMU/TCG guests of the minimal image.

Placement (one session per node, the third 429), the merged list with global ids (`dispo ls` through the
gateway), the relay of a session's token URL to the node holding it, a lost node (kill -9 of its dispod and
its Ray processes: its session ends "node lost", the other goes on, a new session lands on the survivor and its
output and exit status come back through the gateway), the dashboard at the gateway (its page, and a receipt
from the node that holds the session), and the lost node's dispod started again: it reclaims what its session
left (its listing equals the one before) and rejoins.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.errors import Busy, Conflict, NotFound, ServiceError
from tests.clusterworld import NET, cluster, http_get, kill_node, node_listing, start_node, wait_nodes, wait_running
from tests.guests import GuestImages, guest_world
from tests.netns import NetWorld
from tests.tiers import tier

pytestmark = [pytest.mark.root, pytest.mark.vm]

LOST_WITHIN_S = 60

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
        lost: dict[str, object] = {}
        while lost.get("state") != "ended":  # meanwhile the gateway answers 503: the node does not answer
            assert time.monotonic() < deadline, lost
            time.sleep(0.5)
            with contextlib.suppress(ServiceError):
                lost = gw.session(on["nb"])
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

        # The dashboard at the gateway (its link in dispod.url, as a node's): the page over the cluster's
        # profiles, and a session's receipt from the node that holds it, under its global id.
        page = f"{c.url}/ui/{c.token}/"
        assert (tmp_path / "cluster" / "gw-state" / "gateway" / "dispod.url").read_text().strip() == page
        status, body = http_get(c.ns, page)
        assert status == 200 and "<title>dispo sessions</title>" in body and "chromium" in body, (status, body)
        status, body = http_get(c.ns, f"{page}receipt/{gid}")
        assert status == 200 and "Clean: nothing of the session is left." in body and gid in body, (status, body)
        status, body = http_get(c.ns, f"{c.url}/ui/{'x' * 43}/receipt/{gid}")
        assert status == 403, (status, body)

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
