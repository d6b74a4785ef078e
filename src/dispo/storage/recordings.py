"""Recordings: a recorded session's display as a video (and, with --log-requests, its request log) kept on purpose.

    <workspace>/recordings/<session id>/display.webm   VP8 in WebM (runtime/record.py makes it)
                                       /requests.json  with log_requests: the guest's requests
                                       /recording.json what it is: sizes, sha256s, when

A recording is written under a temporary name recorded in the session's journal (`.<id>.new`: a session that
dies mid-way leaves nothing half-made) and renamed into place when the session ends; from then on it is not
the session's: the disposal receipt lists it as kept, with its sha256, as it does a --keep volume. It stays
until `dispo recording rm ID` or until it is older than [recordings] max_age_h (0: until removed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispo.config import Config
from dispo.errors import NotFound
from dispo.infra.txn import Transaction
from dispo.names import check_session_id
from dispo.storage import files

VIDEO = "display.webm"
REQUESTS = "requests.json"
INFO = "recording.json"
MEDIA_TYPE = "video/webm"


def recordings_dir(cfg: Config) -> Path:
    return cfg.workspace / "recordings"


def path_of(cfg: Config, session_id: str) -> Path:
    return recordings_dir(cfg) / check_session_id(session_id)


@dataclass(frozen=True)
class Recording:
    session_id: str
    path: Path           # its directory
    video: Path
    bytes: int
    sha256: str
    created: float
    requests_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "path": str(self.path), "video": str(self.video), "bytes": self.bytes,
                "sha256": self.sha256, "created": self.created, "requests_sha256": self.requests_sha256}

    def describe(self) -> str:
        return f"recording {self.session_id} ({self.video}, sha256 {self.sha256}, kept on purpose)"


def begin(tx: Transaction) -> Path:
    """The session's recording directory while it records, under a temporary name the journal records first."""
    root = recordings_dir(tx.cfg)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = root / f".{tx.session_id}.new"
    tx.journal.record("path", path=str(tmp), session=tx.session_id)
    tmp.mkdir(mode=0o700)
    return tmp


def commit(tx: Transaction, tmp: Path, requests: list[dict[str, Any]] | None) -> Recording:
    """The finished recording (the video in `tmp`) renamed into place and handed over: kept, not the session's."""
    video = tmp / VIDEO
    req_sha = None
    if requests is not None:
        (tmp / REQUESTS).write_text(json.dumps(requests, indent=1, sort_keys=True) + "\n")
        req_sha = files.sha256_file(tmp / REQUESTS)
    final = path_of(tx.cfg, tx.session_id)
    rec = Recording(tx.session_id, final, final / VIDEO, video.stat().st_size, files.sha256_file(video), time.time(),
                    req_sha)
    (tmp / INFO).write_text(json.dumps(rec.to_json(), indent=1, sort_keys=True) + "\n")
    os.rename(tmp, final)
    entry = next(e for e in tx.journal.entries if e.kind == "path" and e.args.get("path") == str(tmp))
    tx.journal.forget(entry)  # kept on purpose: no longer the session's to remove
    return rec


def _read(d: Path) -> Recording | None:
    try:
        info = json.loads((d / INFO).read_text())
        return Recording(d.name, d, d / VIDEO, int(info["bytes"]), str(info["sha256"]), float(info["created"]),
                         info.get("requests_sha256"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find(cfg: Config, session_id: str) -> Recording:
    d = path_of(cfg, session_id)
    rec = _read(d) if d.is_dir() and not d.is_symlink() else None
    if rec is None:
        raise NotFound(f"session {session_id} has no recording",
                       hint='a session records with "record": true (dispo run --record), once it has ended; '
                            "'dispo recording ls' lists them")
    return rec


def list_recordings(cfg: Config) -> list[Recording]:
    root = recordings_dir(cfg)
    if not root.is_dir():
        return []
    found = [_read(d) for d in sorted(root.iterdir()) if not d.name.startswith(".") and d.is_dir()
             and not d.is_symlink()]
    return sorted((r for r in found if r is not None), key=lambda r: r.created)


def remove(cfg: Config, session_id: str) -> Path:
    d = path_of(cfg, session_id)
    if not d.is_dir() or d.is_symlink():
        raise NotFound(f"session {session_id} has no recording", hint="'dispo recording ls' lists them")
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    return d


def sweep(cfg: Config, now: float | None = None) -> list[str]:
    """Remove the recordings older than [recordings] max_age_h (0: none); the ids removed."""
    max_age_h = cfg.recordings.max_age_h
    if not max_age_h:
        return []
    cutoff = (now if now is not None else time.time()) - max_age_h * 3600
    gone = []
    for rec in list_recordings(cfg):
        if rec.created < cutoff:
            remove(cfg, rec.session_id)
            gone.append(rec.session_id)
    return gone


__all__ = ["MEDIA_TYPE", "Recording", "begin", "commit", "find", "list_recordings", "path_of", "recordings_dir",
           "remove", "sweep"]
