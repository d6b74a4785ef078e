"""The disposal receipt: after a session's teardown, proof object by object that nothing is left.

For every host object the session's journal recorded (and did not hand over), a checker looks at the host
itself, not at the journal: is the VMM process (pid + start time) gone, the path, the subvolume, the lease,
the nftables chains, the tap, the stand-in namespace, the jail's cgroups? Then the session's state dir. Then
the image: unchanged, by a cheap proof rather than a hash of gigabytes (see `image_proof`). The result is
appended as one JSON line to `<workspace>/receipts.jsonl` (persistent: the state dir is on tmpfs), shown by
`dispo receipt`, and a receipt that is not clean makes the session end with `NotClean`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dispo.config import Config
from dispo.errors import DispoError
from dispo.infra.journal import Entry
from dispo.infra.proc import run
from dispo.storage.images import Image

log = logging.getLogger(__name__)

RECEIPTS = "receipts.jsonl"
MAX_LINE = 64 * 1024  # a receipt line is small; a longer one in the file is skipped as damaged

Checker = Callable[[Mapping[str, str]], str | None]  # None: gone; else what is still there
CHECKERS: dict[str, Checker] = {}


def checker(kind: str) -> Callable[[Checker], Checker]:
    def register(fn: Checker) -> Checker:
        CHECKERS[kind] = fn
        return fn

    return register


@checker("process")
def _process(a: Mapping[str, str]) -> str | None:
    from dispo.infra.processes import is_same_process

    pid = int(a["pid"])
    return f"process {pid} ({a.get('what', '?')})" if is_same_process(pid, a["starttime"]) else None


@checker("path")
@checker("btrfs-subvolume")
@checker("build-dir")
def _path(a: Mapping[str, str]) -> str | None:
    return f"path {a['path']}" if os.path.lexists(a["path"]) else None


@checker("net-lease")
def _lease(a: Mapping[str, str]) -> str | None:
    from dispo.net import pool

    held = [le for le in pool.read_leases(Path(a["state_dir"])) if le.session_id == a["session"]]
    return f"lease {held[0].subnet}" if held else None


def _elsewhere(a: Mapping[str, str]) -> bool:
    """Recorded in another network namespace: not visible from here (the journal's gc handles it there)."""
    from dispo.net import links

    return "netns" in a and int(a["netns"]) != links.current_netns()


@checker("nft-session")
def _rules(a: Mapping[str, str]) -> str | None:
    from dispo.net import leftover_rules

    if _elsewhere(a):
        return None
    left = leftover_rules(a["session"])  # its chains and verdict-map elements, read over netlink
    return f"nftables {', '.join(left)}" if left else None


@checker("net-link")
def _link(a: Mapping[str, str]) -> str | None:
    from dispo.net import links

    if _elsewhere(a):
        return None
    return f"link {a['name']}" if links.link_exists(a["name"]) else None


@checker("net-standin-netns")
def _netns(a: Mapping[str, str]) -> str | None:
    return f"netns {a['name']}" if Path("/run/netns", a["name"]).exists() else None


@checker("vmm-id")
def _vmm_id(a: Mapping[str, str]) -> str | None:
    from dispo.vmm.sandbox import id_claimed

    return f"VMM uid claim {a['path']}" if id_claimed(a) else None


@checker("jail-cgroup")
def _cgroups(a: Mapping[str, str]) -> str | None:
    left = [d for d in a["dirs"].split(":") if d and os.path.isdir(d)]
    return f"cgroups {', '.join(left)}" if left else None


def image_proof(image: Image) -> dict[str, Any]:
    """What shows the image was not written, cheaply. Every file of the image holder is sealed read-only
    (mode a-w, or a read-only btrfs subvolume); a write through the filesystem changes a file's mtime and
    ctime, and ctime cannot be set from user space, so (inode, size, mtime, ctime) per file proves "no
    write" without reading gigabytes. For btrfs, the subvolume's read-only flag is added (while it is set,
    nothing can write in it); not its generation, which every snapshot taken of it (each session's disk)
    moves. `dispo image verify` still hashes the whole image on demand."""
    files: dict[str, list[int]] = {}
    for p in sorted(image.path.iterdir()):
        st = p.lstat()
        files[p.name] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode]
    proof: dict[str, Any] = {"image": image.name, "sha256": image.sha256, "files": files}
    if image.storage.value == "btrfs":
        proof["readonly"] = run(["btrfs", "property", "get", "-ts", image.path, "ro"], check=False).stdout.strip()
    return proof


@dataclass
class Receipt:
    session_id: str
    clean: bool
    leftovers: list[str]
    checked: int                        # host objects looked at (the journal's, plus the state dir)
    image: dict[str, Any] = field(default_factory=dict)
    image_unchanged: bool | None = None  # None: no image was reached
    started: float = 0.0
    ended: float = 0.0
    teardown_s: float | None = None
    check_s: float = 0.0
    exit_status: int | None = None
    end_reason: str = ""
    kept: list[str] = field(default_factory=list)  # objects kept on purpose (a --keep volume, a recording)
    # With record: the recording kept on purpose (storage/recordings.py): its path, size and sha256.
    recording: dict[str, Any] | None = None
    # With --log-requests: the requests the guest made, by kind ({"dns": 2, "tcp": 3}); None when not logged.
    requests: dict[str, int] | None = None
    objects: list[str] = field(default_factory=list)  # what was checked: each journaled object, described

    def summary(self) -> dict[str, Any]:
        return {"clean": self.clean, "leftovers": self.leftovers, "checked": self.checked,
                "image_unchanged": self.image_unchanged, "teardown_s": self.teardown_s, "check_s": self.check_s,
                "requests": self.requests, "kept": self.kept, "recording": self.recording}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def issue(cfg: Config, *, session_id: str, recorded: list[Entry], state_path: Path, image: Image | None,
          proof_before: dict[str, Any] | None, started: float, teardown_s: float | None, exit_status: int | None,
          end_reason: str, requests: list[dict[str, Any]] | None = None, kept: list[str] | None = None,
          recording: dict[str, Any] | None = None) -> Receipt:
    t0 = time.monotonic()
    leftovers: list[str] = []
    for entry in recorded:
        check = CHECKERS.get(entry.kind)
        if check is None:
            leftovers.append(f"{entry.describe()} (no way to check it: a bug)")
            continue
        try:
            left = check(entry.args)
        except Exception as e:  # a checker that cannot look cannot vouch
            left = f"{entry.describe()} (could not check: {e})"
        if left:
            leftovers.append(left)
    if state_path.exists():
        leftovers.append(f"state dir {state_path}")
    unchanged: bool | None = None
    if image is not None and proof_before is not None:
        try:
            unchanged = image_proof(image) == proof_before
        except OSError:
            unchanged = False
        if not unchanged:
            leftovers.append(f"image {image.name} changed during the session")
    r = Receipt(session_id, not leftovers, leftovers, len(recorded) + 1,
                {"name": image.name, "sha256": image.sha256} if image else {}, unchanged, started, time.time(),
                round(teardown_s, 3) if teardown_s is not None else None, 0.0, exit_status, end_reason)
    r.kept = list(kept or [])
    r.recording = recording
    r.objects = [entry.describe() for entry in recorded]
    if requests is not None:
        r.requests = {}
        for req in requests:
            r.requests[req["kind"]] = r.requests.get(req["kind"], 0) + int(req["count"])
    r.check_s = round(time.monotonic() - t0, 4)
    append(cfg, r)
    return r


def owner_died(meta: Mapping[str, Any]) -> str:
    """The end reason of a session reclaimed from a dead owner's journal."""
    owner = meta.get("owner")
    if owner == "dispod":
        return "reclaimed: its owner (a previous dispod) died"
    pid = meta.get("owner_pid")
    who = f"{owner or 'dispo'}, pid {pid}" if isinstance(pid, int) else str(owner or "dispo")
    return f"reclaimed: its owner ({who}) died"


def issue_reclaimed(cfg: Config, *, session_id: str, meta: Mapping[str, Any], entries: list[Entry],
                    state_path: Path, teardown_s: float) -> Receipt:
    """The receipt of a session whose owner died (SIGKILL, power loss) and that gc or dispod's start tore down
    from its journal: the same checks, object by object, as after a normal end. The image is compared with the
    proof the owner wrote into the journal once it had validated the image (none: not checked)."""
    image: Image | None = None
    proof = meta.get("image_proof")
    if isinstance(proof, dict) and isinstance(meta.get("image"), str):
        from dispo.storage.images import ImageStore

        try:
            image = ImageStore(cfg).get(meta["image"])
        except DispoError:
            image, proof = None, None
    created = meta.get("created")
    return issue(cfg, session_id=session_id, recorded=entries, state_path=state_path, image=image,
                 proof_before=proof if image is not None and isinstance(proof, dict) else None,
                 started=float(created) if isinstance(created, int | float) else 0.0, teardown_s=teardown_s,
                 exit_status=None, end_reason=owner_died(meta))


def receipts_path(cfg: Config) -> Path:
    return cfg.workspace / RECEIPTS


def append(cfg: Config, r: Receipt) -> None:
    path = receipts_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(r.to_json(), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one line at a time from many sessions
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(cfg: Config) -> Iterator[dict[str, Any]]:
    """Every receipt, oldest first; damaged lines are skipped."""
    with contextlib.suppress(FileNotFoundError), open(receipts_path(cfg), "rb") as f:
        for raw in f:
            if len(raw) > MAX_LINE:
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("session_id"), str):
                yield data


def find(cfg: Config, session_id: str | None = None) -> dict[str, Any] | None:
    """The receipt of session_id, or the last one."""
    found = None
    for data in read(cfg):
        if session_id is None or data["session_id"] == session_id:
            found = data
    return found
