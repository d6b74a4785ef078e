"""A small RFB (VNC) client that reads a display's pixels: for recordings (runtime/record.py) and thumbnails.

    with RfbClient.connect(path) as c:   # a unix socket that speaks RFB (a session's vnc.sock)
        w, h = c.size
        frame = c.next_frame()           # w*h*4 bytes, RGBx, the whole screen as it is now

RFB 3.8 (3.7 accepted), security type None only: the guest's Xvnc (guest/app.sh) offers None on the guest's
loopback, reached through the session's forward; a server that offers only something else is refused. The
client asks for 32-bit little-endian true colour (R, G, B in bytes 0, 1, 2) and the Raw and CopyRect encodings,
and keeps one framebuffer of its own that every update is drawn into.

The server is the guest's, so it is treated as hostile: every read is capped while it is read (a name, a
reason, a cut text, a rectangle are each refused once they would pass their cap, never buffered first), the
framebuffer's size is capped, rectangles must lie inside it, an unknown message or encoding is refused, and
every read has a deadline. Any of these is a `RfbError`, and the connection is then useless.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path
from types import TracebackType

VERSIONS = {b"RFB 003.008\n": b"RFB 003.008\n", b"RFB 003.007\n": b"RFB 003.007\n"}
SECURITY_NONE = 1
MAX_WIDTH, MAX_HEIGHT = 4096, 4096  # a framebuffer bigger than this is refused (16 Mpx: 64 MiB of RGBx)
MAX_NAME = 4096          # the desktop's name
MAX_REASON = 4096        # a refusal's reason
MAX_CUT_TEXT = 1 << 20   # the server's clipboard, skipped
MAX_RECTS = 1 << 14      # rectangles in one update
MAX_COLOURS = 256        # SetColourMapEntries, skipped (true colour is asked for)
READ_TIMEOUT_S = 10.0    # no byte for this long: the server is gone or stuck
FRAME_TIMEOUT_S = 30.0   # one whole update must arrive within this
BPP = 4

# Server messages (RFC 6143 7.6).
FRAMEBUFFER_UPDATE, SET_COLOURS, BELL, CUT_TEXT = 0, 1, 2, 3
# Encodings: Raw, CopyRect; and the pseudo-encoding DesktopSize (the server may change the size).
RAW, COPYRECT, DESKTOP_SIZE = 0, 1, -223
# 32 bpp, depth 24, little endian, true colour, max 255 each, red at bit 0, green 8, blue 16: bytes R G B x.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)


class RfbError(Exception):
    """The server said something a VNC server does not, too much of it, or nothing in time."""


class RfbIdle(RfbError):
    """No update began within the wait: the screen did not change. The connection is still good."""


class RfbClient:
    def __init__(self, sock: socket.socket, width: int, height: int, name: str) -> None:
        self._sock = sock
        self.size = (width, height)
        self.name = name
        self._fb = bytearray(width * height * BPP)
        self._drawn = False  # the first update asked for every pixel

    # -- opening --------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = READ_TIMEOUT_S) -> RfbClient:
        """Connect to the RFB server on the unix socket `path` and do the handshake: raises RfbError
        (OSError when nothing listens)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            return cls.handshake(sock, timeout=timeout)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def handshake(cls, sock: socket.socket, *, timeout: float = READ_TIMEOUT_S) -> RfbClient:
        """The handshake on a connected socket (which the client then owns)."""
        reader = _Reader(sock, time.monotonic() + timeout)
        version = reader.exact(12)
        if version not in VERSIONS:
            raise RfbError(f"not an RFB 3.7/3.8 server (it says {version[:12]!r})")
        _send(sock, VERSIONS[version])
        count = reader.u8()
        if count == 0:
            raise RfbError(f"the server refused the connection: {reader.text(MAX_REASON, 'reason')}")
        types = reader.exact(count)
        if SECURITY_NONE not in types:
            raise RfbError(f"the server offers no security type None (it offers {list(types)})")
        _send(sock, bytes([SECURITY_NONE]))
        if version == b"RFB 003.008\n":  # 3.7 sends no result for None
            result = reader.u32()
            if result != 0:
                raise RfbError(f"the server refused the connection: {reader.text(MAX_REASON, 'reason')}")
        _send(sock, b"\x01")  # ClientInit: shared, so a viewer stays connected
        width, height = struct.unpack(">HH", reader.exact(4))
        reader.exact(16)  # the server's pixel format: ours is set next
        name = reader.text(MAX_NAME, "desktop name")
        if not 0 < width <= MAX_WIDTH or not 0 < height <= MAX_HEIGHT:
            raise RfbError(f"a {width}x{height} screen (at most {MAX_WIDTH}x{MAX_HEIGHT})")
        _send(sock, b"\x00\x00\x00\x00" + PIXEL_FORMAT)
        encodings = (RAW, COPYRECT, DESKTOP_SIZE)
        _send(sock, struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))
        return cls(sock, width, height, name)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RfbClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- frames ---------------------------------------------------------------------------------------
    def next_frame(self, *, incremental: bool = True, wait: float | None = FRAME_TIMEOUT_S) -> bytes:
        """Ask for an update and read it: the whole screen after it, width*height*4 bytes RGBx (a copy). The
        first frame asks for every pixel, as does `incremental=False`. A server sends an incremental update
        only once something changed: `wait` is how long to wait for one to begin (None: until the connection
        ends; `RfbIdle` when it passed, and the connection is still good); once begun, it must arrive whole
        within FRAME_TIMEOUT_S."""
        w, h = self.size
        _send(self._sock, struct.pack(">BBHHHH", 3, 1 if incremental and self._drawn else 0, 0, 0, w, h))
        while True:
            kind = self._first_byte(wait)
            reader = _Reader(self._sock, time.monotonic() + FRAME_TIMEOUT_S)
            if kind == FRAMEBUFFER_UPDATE:
                self._update(reader)
                self._drawn = True
                return bytes(self._fb)
            if kind == SET_COLOURS:
                reader.exact(3)
                n = struct.unpack(">H", reader.exact(2))[0]
                if n > MAX_COLOURS:
                    raise RfbError(f"a colour map of {n} entries (at most {MAX_COLOURS})")
                reader.exact(6 * n)
            elif kind == BELL:
                continue
            elif kind == CUT_TEXT:
                reader.exact(3)
                reader.skip(reader.u32(), MAX_CUT_TEXT, "cut text")
            else:
                raise RfbError(f"unknown server message type {kind}")

    def _first_byte(self, wait: float | None) -> int:
        self._sock.settimeout(wait)
        try:
            b = self._sock.recv(1)
        except TimeoutError:
            raise RfbIdle(f"no update within {wait:g} s") from None
        except OSError as e:
            raise RfbError(f"the connection failed: {e.strerror or e}") from None
        if not b:
            raise RfbError("the server closed the connection")
        return b[0]

    def frame(self) -> bytes:
        """The screen as last drawn (a copy)."""
        return bytes(self._fb)

    def interrupt(self) -> None:
        """From another thread: end the connection, so a `next_frame` that waits returns (with RfbError)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _update(self, reader: _Reader) -> None:
        reader.exact(1)
        count = struct.unpack(">H", reader.exact(2))[0]
        if count > MAX_RECTS:
            raise RfbError(f"an update of {count} rectangles (at most {MAX_RECTS})")
        for _ in range(count):
            x, y, w, h, enc = struct.unpack(">HHHHi", reader.exact(12))
            if enc == DESKTOP_SIZE:
                if not 0 < w <= MAX_WIDTH or not 0 < h <= MAX_HEIGHT:
                    raise RfbError(f"a {w}x{h} screen (at most {MAX_WIDTH}x{MAX_HEIGHT})")
                self.size = (w, h)
                self._fb = bytearray(w * h * BPP)
                continue
            fw, fh = self.size
            if x + w > fw or y + h > fh:
                raise RfbError(f"a rectangle {w}x{h}+{x}+{y} outside the {fw}x{fh} screen")
            if enc == RAW:
                row = w * BPP
                for line in range(h):
                    at = ((y + line) * fw + x) * BPP
                    self._fb[at:at + row] = reader.exact(row)
            elif enc == COPYRECT:
                sx, sy = struct.unpack(">HH", reader.exact(4))
                if sx + w > fw or sy + h > fh:
                    raise RfbError(f"a copy from {w}x{h}+{sx}+{sy}, outside the {fw}x{fh} screen")
                rows = [bytes(self._fb[((sy + i) * fw + sx) * BPP:((sy + i) * fw + sx + w) * BPP]) for i in range(h)]
                for i, data in enumerate(rows):
                    at = ((y + i) * fw + x) * BPP
                    self._fb[at:at + w * BPP] = data
            else:
                raise RfbError(f"a rectangle in encoding {enc}, which was not asked for")


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise RfbError(f"the connection failed: {e.strerror or e}") from None


class _Reader:
    """Reads of known, capped lengths from the socket before a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise RfbError("the server sent nothing in time")
            self._sock.settimeout(min(left, READ_TIMEOUT_S))
            try:
                chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError:
                raise RfbError("the server sent nothing in time") from None
            except OSError as e:
                raise RfbError(f"the connection failed: {e.strerror or e}") from None
            if not chunk:
                raise RfbError("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def u8(self) -> int:
        return self.exact(1)[0]

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.exact(4))[0]
        return value

    def text(self, cap: int, what: str) -> str:
        n = self.u32()
        if n > cap:
            raise RfbError(f"a {what} of {n} bytes (at most {cap})")
        return self.exact(n).decode("utf-8", "replace")

    def skip(self, n: int, cap: int, what: str) -> None:
        if n > cap:
            raise RfbError(f"a {what} of {n} bytes (at most {cap})")
        while n:
            n -= len(self.exact(min(n, 65536)))


__all__ = ["MAX_HEIGHT", "MAX_WIDTH", "RfbClient", "RfbError", "RfbIdle"]
