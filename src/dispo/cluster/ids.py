"""Global session ids: NODE~ID at the gateway, the bare ID on the node (unchanged: journals, device names and
reclaim stay local). `~` is unreserved in URLs, so a global id is one path segment as it is
(/v1/sessions/n1~1a2b3c4d/...), never encoded; node names have no `~` (config.NODE_NAME)."""

from __future__ import annotations

from dispo.config import NODE_NAME
from dispo.errors import InvalidInput
from dispo.names import check_session_id

SEP = "~"


def global_id(node: str, local: str) -> str:
    return f"{node}{SEP}{local}"


def split(gid: str) -> tuple[str, str]:
    """(node, local id) of a global id; InvalidInput for anything else."""
    node, sep, local = gid.partition(SEP)
    if not sep or not NODE_NAME.fullmatch(node):
        raise InvalidInput(f"invalid session id {gid[:80]!r}",
                           hint="a cluster's session ids are NODE~ID, e.g. n1~1a2b3c4d; see 'dispo ls'")
    return node, check_session_id(local)
