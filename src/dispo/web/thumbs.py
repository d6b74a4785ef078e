"""Thumbnails: a small PNG of a running session's screen, for the dashboard's rows (/ui/TOKEN/thumb/ID).

Read from the session's display socket (the `vnc.sock` its viewer relays) with the capped RFB client
(infra/rfbclient.py): one connection, one whole frame, closed. Nothing runs in the guest for it: its Xvnc
serves the thumbnail as it serves a viewer. The frame is scaled down (nearest pixel) to at most WIDTH pixels
wide and encoded as a PNG with zlib alone (no image library).

Bounded: a picture is kept CACHE_S seconds per session (however many pages ask, the guest is asked at most
once per CACHE_S), at most GRABS grabs run at once (each in a thread off the event loop, with the client's
deadlines), and the cache forgets sessions that are gone.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from dispo.infra.rfbclient import RfbClient, RfbError

WIDTH = 240          # the thumbnail's width at most (a smaller screen is not scaled up)
CACHE_S = 3.0        # a session's picture is this fresh at most: every page asks every few seconds
GRABS = 2            # at most this many grabs at once (each reads a whole frame, up to 64 MiB for 4096x4096)
CONNECT_TIMEOUT_S = 5.0
FRAME_WAIT_S = 5.0   # the first, full update must begin within this


def scale(frame: bytes, width: int, height: int, most: int = WIDTH) -> tuple[bytes, int, int]:
    """RGBx pixels scaled down (nearest pixel) to at most `most` wide: RGB rows, and the new size."""
    tw = min(width, most)
    th = max(1, height * tw // width)
    cols = [(x * width // tw) * 4 for x in range(tw)]
    out = bytearray()
    for y in range(th):
        row = (y * height // th) * width * 4
        for c in cols:
            out += frame[row + c:row + c + 3]
    return bytes(out), tw, th


def png(rgb: bytes, width: int, height: int) -> bytes:
    """A truecolour 8-bit PNG of RGB rows (filter type 0 on every row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def grab(socket_path: Path) -> bytes:
    """The screen behind `socket_path` now, as a thumbnail PNG. Raises RfbError or OSError."""
    with RfbClient.connect(socket_path, timeout=CONNECT_TIMEOUT_S) as c:
        frame = c.next_frame(incremental=False, wait=FRAME_WAIT_S)
        w, h = c.size
    return png(*scale(frame, w, h))


@dataclass
class _Entry:
    at: float = 0.0
    image: bytes | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Thumbnails:
    """The pictures of the sessions, each kept CACHE_S seconds; `get` blocks (call it off the event loop)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._grabs = threading.BoundedSemaphore(GRABS)

    def get(self, session_id: str, socket_path: Path) -> bytes | None:
        """The session's picture, fresh within CACHE_S; None when its display does not answer (yet)."""
        with self._lock:
            entry = self._entries.setdefault(session_id, _Entry())
        with entry.lock:  # pages asking at once for the same session wait for one grab
            if entry.image is not None and time.monotonic() - entry.at < CACHE_S:
                return entry.image
            if not self._grabs.acquire(timeout=CONNECT_TIMEOUT_S + FRAME_WAIT_S):
                return entry.image  # busy: the last picture (or none) rather than a queue of grabs
            try:
                entry.image = grab(socket_path)
            except (RfbError, OSError):
                entry.image = None
            finally:
                self._grabs.release()
            entry.at = time.monotonic()
            return entry.image

    def keep_only(self, session_ids: set[str]) -> None:
        """Forget the pictures of sessions not in `session_ids` (they ended)."""
        with self._lock:
            for sid in list(self._entries):
                if sid not in session_ids:
                    del self._entries[sid]
