"""A node's agent: the Ray actor, pinned to its node, that tells the gateway what the node can take.

It runs in a Ray worker process on the node (started by the node's raylet, in the node's network namespace,
as root) and asks the node's dispod over its root-only unix socket, so it needs no token and its numbers are
live. A plain class: node.py makes it a Ray actor (ray.remote), so this module does not import Ray.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dispo.settings import meminfo_mib

AGENT_PREFIX = "dispo-node:"  # + the node's name: the agent's Ray actor name, in the "dispo" namespace
NAMESPACE = "dispo"
ASK_TIMEOUT_S = 5.0


def mem_available_mib() -> int:
    return meminfo_mib("MemAvailable", 0)


class NodeAgent:
    def __init__(self, node: str, url: str, socket: str, templates_dir: str) -> None:
        self.node = node
        self.url = url  # where the gateway reaches this node's dispod (its --listen)
        self.socket = socket
        self.templates_dir = Path(templates_dir)

    def info(self) -> dict[str, Any]:
        """The node as placement sees it: free session slots and guest memory, images (by digest), profiles
        (and whether their image is here), templates and warm guests, and its sessions (for a lost node's)."""
        from dispo.client import DispodClient
        from dispo.errors import DispoError

        with DispodClient(uds=self.socket, timeout=ASK_TIMEOUT_S) as client:
            health = client.health()
            sessions = client.sessions(all=True)
            images = [{"name": i["name"], "digest": i["digest"]} for i in client.images()]
            profiles = {p["name"]: {"image": p["image"], "image_exists": bool(p["image_exists"])}
                        for p in client.profiles()}
            warm: dict[str, int] = {}
            try:
                pool = client.pool()
            except DispoError:
                pool = {}
            for slot in pool.get("slots") or []:
                if isinstance(slot, dict) and slot.get("ready"):
                    warm[str(slot["name"])] = int(slot["ready"])
        templates = sorted(p.name for p in self.templates_dir.iterdir()) if self.templates_dir.is_dir() else []
        live = int(health["sessions"])
        most = int(health["max_sessions"])
        return {"node": self.node, "url": self.url, "sessions": live, "max_sessions": most,
                "free_slots": max(0, most - live), "mem_available_mib": mem_available_mib(),
                "images": images, "profiles": profiles, "templates": templates, "warm": warm,
                "statuses": sessions, "time": time.time()}
