"""The cluster gateway's own logic, without Ray or guests (dispo/cluster/): global ids, how a node's answers
are put in the gateway's words, placement's choice and its reasons, and a lost node's sessions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from dispo.cluster import ids, secret
from dispo.cluster.gateway import LOST_AFTER_S, NODE_LOST, Gateway, NodeView, rewrite
from dispo.config import Config
from dispo.errors import ConfigError, InvalidInput
from tests.fakeworld import cfg, serving

__all__ = ["cfg"]  # the fixture from tests/fakeworld.py

LOCAL = "1a2b3c4d"


def test_global_ids_are_node_tilde_id_and_nothing_else() -> None:
    assert ids.global_id("n1", LOCAL) == "n1~1a2b3c4d"
    assert ids.split("n1~1a2b3c4d") == ("n1", LOCAL)
    for bad in ("1a2b3c4d", "n1/1a2b3c4d", "N1~1a2b3c4d", "n1~1a2b", "~1a2b3c4d", "n1~../etc"):
        with pytest.raises(InvalidInput, match="invalid session id"):
            ids.split(bad)


def test_a_nodes_answer_gets_the_global_id_and_the_gateways_address() -> None:
    token = f"abc{LOCAL}xyz_-q"  # the id inside a token is not the id
    answer = {"id": LOCAL, "viewer_url": f"http://10.0.0.2:8686/viewer/{LOCAL}/{token}/",
              "cdp_url": f"ws://10.0.0.2:8686/automation/{LOCAL}/{token}/cdp",
              "error": {"message": f"session {LOCAL} has no viewer"}, "steps": [LOCAL, 3], "state": "running"}
    out = rewrite(answer, "n1", LOCAL, "10.0.0.2:8686", "gw:8686")
    assert out == {"id": "n1~1a2b3c4d", "viewer_url": f"http://gw:8686/viewer/n1~1a2b3c4d/{token}/",
                   "cdp_url": f"ws://gw:8686/automation/n1~1a2b3c4d/{token}/cdp",
                   "error": {"message": "session n1~1a2b3c4d has no viewer"}, "steps": ["n1~1a2b3c4d", 3],
                   "state": "running"}


def _view(name: str, *, free: int, most: int = 1, images: tuple[str, ...] = ("minimal",), warm: int = 0,
          mem: int = 1000, statuses: list[dict[str, Any]] | None = None) -> NodeView:
    return NodeView(name, {"url": f"http://{name}:8686", "free_slots": free, "sessions": most - free,
                           "max_sessions": most, "images": [{"name": i, "digest": "0" * 64} for i in images],
                           "profiles": {"chromium": {"image": "chromium", "image_exists": "chromium" in images}},
                           "warm": {"chromium": warm} if warm else {}, "templates": [], "mem_available_mib": mem,
                           "statuses": statuses or []}, time.monotonic())


def _gateway(*views: NodeView) -> Gateway:
    g = Gateway("head:6379", "s" * 43, lambda _line: None)
    g.nodes = {v.name: v for v in views}
    return g


def test_placement_prefers_a_warm_guest_then_free_slots_then_memory() -> None:
    g = _gateway(_view("a", free=1, most=4, mem=9000), _view("b", free=3, most=4), _view("c", free=0))
    assert [v.name for v in g.candidates({"image": "minimal"})[0]] == ["b", "a"]
    g = _gateway(_view("a", free=1, images=("chromium",)), _view("b", free=3, most=4, images=("chromium",)),
                 _view("w", free=1, images=("chromium",), warm=1))
    assert [v.name for v in g.candidates({"profile": "chromium"})[0]] == ["w", "b", "a"]


def test_no_placement_says_why_in_one_line() -> None:
    assert _gateway().candidates({})[1] == "no node is in the cluster (none answered the gateway)"
    full = _gateway(_view("n2", free=0), _view("n1", free=0))
    assert full.candidates({"image": "minimal"}) == ([], "every node is at its max_sessions (n1 1/1, n2 1/1)")
    assert full.candidates({"profile": "chromium"})[1].startswith("no node holds the image chromium")


def test_a_silent_node_is_lost_and_its_live_sessions_end_node_lost() -> None:
    live = {"id": LOCAL, "state": "running", "viewer_url": None, "end_reason": None}
    done = {"id": "00000000", "state": "ended", "end_reason": "the command exited with status 0"}
    g = _gateway(_view("n1", free=0, statuses=[live, done]), _view("n2", free=1))
    g.nodes["n1"].seen -= LOST_AFTER_S + 1
    g._age(time.monotonic())
    assert set(g.nodes) == {"n2"} and g.lost_nodes == {"n1"}
    assert set(g.lost) == {"n1~1a2b3c4d"}
    status = g.lost["n1~1a2b3c4d"]
    assert (status["state"], status["end_reason"], status["end_kind"]) == ("ended", NODE_LOST, "node_lost")


def test_a_node_takes_the_cluster_secret_as_the_apis_bearer_and_only_it(cfg: Config) -> None:
    cluster_secret = "c" * 43
    with serving(cfg, cluster_secret=cluster_secret) as svc, svc.tcp(auth=False) as http:
        for bearer, status in ((cluster_secret, 200), (svc.token, 200), ("c" * 42 + "d", 401), ("", 401)):
            r = http.get("/v1/health", headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
            assert r.status_code == status, (bearer, r.text)
    with serving(cfg) as svc, svc.tcp(auth=False) as http:  # a single host: no secret opens it
        assert http.get("/v1/health", headers={"Authorization": f"Bearer {cluster_secret}"}).status_code == 401


def test_a_nodes_dashboard_pages_of_a_session_open_to_the_cluster_secret_and_the_link_alone(cfg: Config) -> None:
    """The gateway asks a node for a session's receipt and thumbnail with the cluster secret as its bearer (it
    has no node's dashboard token); a single host's dashboard takes its link's token only."""
    cluster_secret = "c" * 43
    with serving(cfg, cluster_secret=cluster_secret) as svc, svc.tcp(auth=False) as http:
        for path, bearer, status in (("/ui/-/receipt/0badf00d", cluster_secret, 200),
                                     ("/ui/-/receipt/0badf00d", "c" * 42 + "d", 403),
                                     ("/ui/-/receipt/0badf00d", "", 403),
                                     (f"/ui/{svc.token}/receipt/0badf00d", "", 200)):
            r = http.get(path, headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
            assert r.status_code == status, (path, bearer, r.text)
        assert "No receipt was written for this session" in http.get(
            "/ui/-/receipt/0badf00d", headers={"Authorization": f"Bearer {cluster_secret}"}).text
    with serving(cfg) as svc, svc.tcp(auth=False) as http:  # a single host: the secret opens nothing
        r = http.get("/ui/-/receipt/0badf00d", headers={"Authorization": f"Bearer {cluster_secret}"})
        assert r.status_code == 403, r.text


def test_the_cluster_secret_file_must_be_root_only(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    with pytest.raises(ConfigError, match="no such file"):
        secret.read(path)
    made = secret.read(path, make=True)  # the gateway makes it
    assert secret.read(path) == made and oct(path.stat().st_mode & 0o777) == "0o600"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="mode is 0644"):
        secret.read(path)
