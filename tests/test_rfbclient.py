"""The RFB client that reads a display's pixels (infra/rfbclient.py): frames from a server that draws, and a
hostile server's over-long or garbage answers refused within their caps."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from dispo.infra import rfbclient
from dispo.infra.rfbclient import RfbClient, RfbError, RfbIdle

SERVER_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


def init(width: int = 4, height: int = 2, name: bytes = b"test") -> bytes:
    return struct.pack(">HH", width, height) + SERVER_FORMAT + struct.pack(">I", len(name)) + name


HELLO = b"RFB 003.008\n" + bytes([1, 1]) + struct.pack(">I", 0)


def rect(xywh: tuple[int, int, int, int], enc: int, data: bytes) -> bytes:
    return struct.pack(">HHHHi", *xywh, enc) + data


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


@pytest.fixture
def server() -> Iterator[Callable[[bytes], socket.socket]]:
    """A server that sends `script` (and reads whatever comes); the client's end of the socket."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(script: bytes) -> socket.socket:
        ours, theirs = socket.socketpair()
        socks.extend((ours, theirs))

        def serve() -> None:
            try:
                theirs.sendall(script)
                while theirs.recv(65536):
                    pass
            except OSError:
                pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return ours

    yield start
    for s in socks:
        s.close()
    for t in threads:
        t.join(5)


def test_frames_raw_and_copyrect(server: Callable[[bytes], socket.socket]) -> None:
    red, blue = bytes([255, 0, 0, 0]), bytes([0, 0, 255, 0])
    script = HELLO + init() + update(rect((0, 0, 4, 2), 0, red * 8)) + update(
        rect((0, 0, 1, 1), 0, blue), rect((3, 1, 1, 1), 1, struct.pack(">HH", 0, 0)))
    with RfbClient.handshake(server(script), timeout=5) as c:
        assert c.size == (4, 2) and c.name == "test"
        assert c.next_frame() == red * 8
        frame = c.next_frame()
        assert frame[:4] == blue and frame[-4:] == blue and frame[4:28] == red * 6


def test_static_screen_is_idle_not_broken(server: Callable[[bytes], socket.socket]) -> None:
    red = bytes([255, 0, 0, 0])
    with RfbClient.handshake(server(HELLO + init(1, 1) + update(rect((0, 0, 1, 1), 0, red))), timeout=5) as c:
        assert c.next_frame() == red
        with pytest.raises(RfbIdle):
            c.next_frame(wait=0.2)
        assert c.frame() == red


@pytest.mark.parametrize(("script", "message"), [
    (b"HTTP/1.1 200 OK\r\n\r\n", "not an RFB"),
    (b"RFB 003.003\n", "not an RFB"),
    (b"RFB 003.008\n" + bytes([1, 2]), "no security type None"),
    (b"RFB 003.008\n" + bytes([0]) + struct.pack(">I", 1 << 30), "reason of 1073741824 bytes"),
    (HELLO + struct.pack(">HH", 65535, 65535) + SERVER_FORMAT + struct.pack(">I", 0), "65535x65535 screen"),
    (HELLO + struct.pack(">HH", 4, 2) + SERVER_FORMAT + struct.pack(">I", 1 << 31), "desktop name of"),
    (HELLO + init() + update(rect((3, 0, 4, 2), 0, b"")), "outside the 4x2 screen"),
    (HELLO + init() + update(rect((0, 0, 1, 1), 16, b"")), "encoding 16"),
    (HELLO + init() + struct.pack(">BxH", 0, 65535), "65535 rectangles"),
    (HELLO + init() + bytes([3, 0, 0, 0]) + struct.pack(">I", 1 << 30), "cut text of"),
    (HELLO + init() + bytes([77]), "unknown server message type 77"),
    (HELLO + init() + update(rect((0, 0, 4, 2), 0, b"\0" * 10)), "nothing in time"),
])
def test_hostile_server_refused(server: Callable[[bytes], socket.socket], script: bytes, message: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rfbclient, "FRAME_TIMEOUT_S", 0.5)
    with pytest.raises(RfbError, match=message):
        c = RfbClient.handshake(server(script), timeout=1)
        c.next_frame(wait=1)


def test_connection_closed_mid_frame(server: Callable[[bytes], socket.socket]) -> None:
    sock = server(HELLO + init())
    c = RfbClient.handshake(sock, timeout=5)
    c.interrupt()
    with pytest.raises(RfbError):
        c.next_frame(wait=5)
    c.close()
