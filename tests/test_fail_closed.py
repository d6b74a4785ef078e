"""A live session whose firewall rules disappear ends (fails closed), with the reason, and leaves nothing.

The session runs with the real network (a veth stand-in for the guest's NIC, real nftables rules in the test's
"host" namespace) and the fake VMM and guest (tests/fakes.py); its owner is a small script run in that
namespace. The test flushes the ruleset of that namespace only, as someone running `nft flush ruleset` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fakes
from tests.netns import NetWorld, dispo_links, in_ns, net_world
from tests.tiers import tier

pytestmark = pytest.mark.root

_OWNER = """
import dataclasses, json, sys
from pathlib import Path
from dispo import config
from dispo.runtime import Runtime, build
from dispo.runtime.machinery import REAL
from tests import fakes
cfg = config.load(Path(sys.argv[1]), env={})
mixed = dataclasses.replace(fakes.machinery(), attach_network=REAL.attach_network,
                            network_missing=REAL.network_missing, name="fake guest, real network")
live = Runtime(cfg, machinery=mixed).start(build(cfg, command=["sleep", "600"]))
while live.state.value == "starting":
    live.wait(0.05)
print(json.dumps({"id": live.id, "state": live.state.value}), flush=True)
live.wait(120)
print(json.dumps({"end_reason": live.end_reason, "error": live.error.one_line() if live.error else None,
                  "clean": live.receipt.clean if live.receipt else None}), flush=True)
"""


@pytest.fixture
@tier("root")
def world(tmp_path: Path) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces and nftables")
    with net_world(tmp_path / "w", servers=False) as w:
        yield w


def test_flushed_rules_end_the_session(world: NetWorld, tmp_path: Path) -> None:
    w = world
    cfg = fakes.config(tmp_path)
    path = fakes.config_file(tmp_path)
    path.write_text(path.read_text() + '[net]\nlink = "veth-standin"\ndns = "none"\n')
    owner = w.spawn(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-c", _OWNER, str(path)],
                    env=fakes.env(tmp_path), cwd=fakes.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert owner.stdout is not None
    first = json.loads(owner.stdout.readline() or "{}")
    assert first.get("state") == "running", owner.communicate(timeout=30)
    sid = first["id"]
    assert dispo_links(w.host) == {f"dsp-{sid}"} and f"s-{sid}-out" in in_ns(w.host, "nft", "list", "ruleset").stdout
    in_ns(w.host, "nft", "flush", "ruleset")  # in the test's host namespace only
    out, err = owner.communicate(timeout=60)
    end = json.loads(out.strip().splitlines()[-1])
    assert "firewall rules of the session disappeared" in end["end_reason"], (end, err)
    assert end["error"] and "ended to fail closed" in end["error"]
    assert end["clean"] is True, err  # the teardown still removed everything it had made
    assert dispo_links(w.host) == set()
    assert not list((cfg.state_dir / "sessions").iterdir())
    assert fakes.fake_vmm_pids(state_dir=cfg.state_dir) == []
