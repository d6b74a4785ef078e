"""Thumbnails (web/thumbs.py): the PNG is a real one with the screen's pixels, scaled down; a session's picture is
grabbed once per CACHE_S however often it is asked; a display that does not answer gives no picture."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.web import thumbs
from tests import fakes
from tests.fakeworld import SAFETY_S


def decode(png: bytes) -> tuple[int, int, bytes]:
    """A PNG of web/thumbs.py's kind (8-bit RGB, filter 0), decoded by hand: width, height, RGB rows."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    at, idat, size = 8, b"", (0, 0)
    while at < len(png):
        n = struct.unpack(">I", png[at:at + 4])[0]
        kind, data = png[at + 4:at + 8], png[at + 8:at + 8 + n]
        assert struct.unpack(">I", png[at + 8 + n:at + 12 + n])[0] == zlib.crc32(kind + data)
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", data[:10])
            assert (depth, colour) == (8, 2)
            size = (w, h)
        elif kind == b"IDAT":
            idat += data
        at += 12 + n
    raw = zlib.decompress(idat)
    w, h = size
    rows = [raw[y * (w * 3 + 1):(y + 1) * (w * 3 + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, b"".join(r[1:] for r in rows)


def pixel(rgb: bytes, w: int, x: int, y: int) -> tuple[int, int, int]:
    at = (y * w + x) * 3
    return rgb[at], rgb[at + 1], rgb[at + 2]


def test_a_frame_becomes_a_scaled_down_png_with_its_pixels() -> None:
    w, h = 960, 20  # left half red, right half blue (RGBx)
    frame = b"".join((b"\xff\x00\x00\x00" if x < w // 2 else b"\x00\x00\xff\x00") for x in range(w)) * h
    width, height, rgb = decode(thumbs.png(*thumbs.scale(frame, w, h)))
    assert (width, height) == (thumbs.WIDTH, 5)
    assert pixel(rgb, width, 10, 2) == (255, 0, 0) and pixel(rgb, width, width - 10, 2) == (0, 0, 255)
    small = b"\x01\x02\x03\x00" * (8 * 4)  # a screen narrower than WIDTH is not scaled up
    assert decode(thumbs.png(*thumbs.scale(small, 8, 4)))[:2] == (8, 4)


@pytest.fixture
def fake_display(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "vnc.sock"
    proc = subprocess.Popen([sys.executable, "-c", fakes._FAKE_VNC, str(sock)])
    try:
        deadline = time.monotonic() + SAFETY_S
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        yield sock
    finally:
        proc.kill()
        proc.wait()


def test_the_fake_display_gives_a_thumbnail_of_its_colour_grabbed_once_per_cache_period(
        fake_display: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grabs: list[Path] = []
    real = thumbs.grab
    def counted(path: Path) -> bytes:
        grabs.append(path)
        return real(path)

    monkeypatch.setattr(thumbs, "grab", counted)
    monkeypatch.setattr(thumbs, "CACHE_S", 3600.0)  # nothing expires during the test: one grab, whatever the speed
    t = thumbs.Thumbnails()
    first = t.get("0123abcd", fake_display)
    assert first is not None and t.get("0123abcd", fake_display) == first and len(grabs) == 1
    w, h, rgb = decode(first)
    sw, sh = fakes.SCREEN_SIZE
    assert (w, h) == (thumbs.WIDTH, sh * thumbs.WIDTH // sw)
    assert pixel(rgb, w, w // 2, h // 2) == fakes.SCREEN_RGB and pixel(rgb, w, 2, 2) == fakes.BAR_RGB
    t.keep_only(set())  # the session ended: its picture is forgotten
    monkeypatch.setattr(thumbs, "CACHE_S", 0.0)
    assert t.get("0123abcd", fake_display) == first and len(grabs) == 2


def test_a_display_that_does_not_answer_gives_no_picture(tmp_path: Path) -> None:
    assert thumbs.Thumbnails().get("0123abcd", tmp_path / "nothing.sock") is None
    silent = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as s:  # accepts (the backlog), never speaks: the client's deadline ends it
        s.bind(str(silent))
        s.listen(1)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(thumbs, "CONNECT_TIMEOUT_S", 0.2)
            assert thumbs.Thumbnails().get("0123abcd", silent) is None
