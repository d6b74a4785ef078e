"""A view link's guard on the VNC bridge: the client's side of RFB (RFC 6143) parsed, input dropped.

The bridge (web/viewer.py) relays bytes; for a watch-only viewer it feeds what the browser sends through
`InputFilter`, which passes the handshake and the messages that only ask for pixels, and drops every message
that would act on the guest: KeyEvent, PointerEvent, ClientCutText, QEMU's extended key event, SetDesktopSize,
xvp (shutdown/reboot) and gii (input devices). The client is treated as hostile: a version, security type or
message type it does not know, or a length past its cap, is a `ProtocolViolation` and the bridge closes.
Nothing is ever buffered beyond one bounded message; a dropped message's payload is skipped as it arrives.

The guest's Xvnc (guest/app.sh) speaks RFB 3.8 with security type None; 3.7 and VNC authentication are also
understood. RFB 3.3 (where the server, not the client, picks the security type) is refused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import Enum

VERSIONS = (b"RFB 003.007\n", b"RFB 003.008\n")
SECURITY_NONE, SECURITY_VNC = 1, 2
VNC_AUTH_RESPONSE = 16
MAX_ENCODINGS = 256        # SetEncodings: noVNC sends about 30
MAX_FENCE_PAYLOAD = 64     # RFB's own cap on a fence's payload
MAX_SCREENS = 16           # SetDesktopSize's screens (dropped, but parsed to skip it)
MAX_CUT_TEXT = 1 << 20     # ClientCutText skipped: the same cap as a WebSocket message of the bridge

# Message types (RFC 6143 7.5, and the registered extensions noVNC uses).
SET_PIXEL_FORMAT, SET_ENCODINGS, UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CUT_TEXT = 0, 2, 3, 4, 5, 6
CONTINUOUS_UPDATES, FENCE, XVP, SET_DESKTOP_SIZE, GII, QEMU = 150, 248, 250, 251, 253, 255
INPUT = frozenset({KEY_EVENT, POINTER_EVENT, CUT_TEXT, XVP, SET_DESKTOP_SIZE, GII, QEMU})
_FIXED = {SET_PIXEL_FORMAT: 20, UPDATE_REQUEST: 10, KEY_EVENT: 8, POINTER_EVENT: 6, CONTINUOUS_UPDATES: 10,
          XVP: 4}


class ProtocolViolation(ValueError):
    """The client sent what a VNC viewer does not (or too much of it): the bridge closes."""


class _Phase(Enum):
    VERSION = 1
    SECURITY = 2
    VNC_AUTH = 3
    CLIENT_INIT = 4
    MESSAGES = 5


_HANDSHAKE = {_Phase.VERSION: len(VERSIONS[0]), _Phase.SECURITY: 1, _Phase.VNC_AUTH: VNC_AUTH_RESPONSE,
              _Phase.CLIENT_INIT: 1}


def _set_encodings(p: bytearray) -> int:
    if len(p) < 4:
        return 4
    count = int.from_bytes(p[2:4], "big")
    if count > MAX_ENCODINGS:
        raise ProtocolViolation(f"SetEncodings with {count} encodings (at most {MAX_ENCODINGS})")
    return 4 + 4 * count


def _fence(p: bytearray) -> int:
    if len(p) < 9:
        return 9
    if p[8] > MAX_FENCE_PAYLOAD:
        raise ProtocolViolation(f"a fence with {p[8]} bytes of payload (at most {MAX_FENCE_PAYLOAD})")
    return 9 + p[8]


def _desktop_size(p: bytearray) -> int:
    if len(p) < 8:
        return 8
    if p[6] > MAX_SCREENS:
        raise ProtocolViolation(f"SetDesktopSize with {p[6]} screens (at most {MAX_SCREENS})")
    return 8 + 16 * p[6]


def _qemu(p: bytearray) -> int:
    if len(p) < 2:
        return 2
    if p[1] == 0:
        return 12  # extended key event
    if p[1] != 1:
        raise ProtocolViolation(f"QEMU client message of subtype {p[1]}")
    if len(p) < 4:
        return 4
    return 10 if int.from_bytes(p[2:4], "big") == 2 else 4  # audio: set its format (10), on or off (4)


# The messages whose length their header says; ClientCutText's and gii's header alone (the rest is skipped).
_SIZES: dict[int, Callable[[bytearray], int]] = {
    SET_ENCODINGS: _set_encodings, FENCE: _fence, SET_DESKTOP_SIZE: _desktop_size, QEMU: _qemu,
    CUT_TEXT: lambda p: 8, GII: lambda p: 4}


class InputFilter:
    """Client-to-server RFB, incrementally: `feed(data)` returns the bytes that may reach the server."""

    def __init__(self) -> None:
        self._phase = _Phase.VERSION
        self._pending = bytearray()  # the start of a message not complete yet (bounded by `_needed`)
        self._skip = 0               # bytes of a dropped message's payload still to come
        self.dropped = 0             # input messages dropped so far

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        view = memoryview(data)
        while True:
            if self._skip:
                if not view:
                    break
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            need = self._needed()  # grows as a header's length fields arrive
            if len(self._pending) >= need:
                out += self._complete(bytes(self._pending))
                self._pending.clear()
                continue
            if not view:
                break
            take = min(len(view), need - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
        return bytes(out)

    def _needed(self) -> int:
        """How many bytes the message in `_pending` has in all, as far as its header says yet."""
        if self._phase is not _Phase.MESSAGES:
            return _HANDSHAKE[self._phase]
        p = self._pending
        if not p:
            return 1
        if p[0] in _FIXED:
            return _FIXED[p[0]]
        size = _SIZES.get(p[0])
        if size is None:
            raise ProtocolViolation(f"client message type {p[0]}, which a watch-only viewer does not send")
        return size(p)

    def _complete(self, message: bytes) -> bytes:
        """A whole message (or handshake step): what passes, and the phase after it."""
        phase = self._phase
        if phase is _Phase.VERSION:
            if message not in VERSIONS:
                raise ProtocolViolation(f"RFB version {message[:12]!r} (only 3.7 and 3.8)")
            self._phase = _Phase.SECURITY
        elif phase is _Phase.SECURITY:
            if message[0] not in (SECURITY_NONE, SECURITY_VNC):
                raise ProtocolViolation(f"security type {message[0]} (only None and VNC authentication)")
            self._phase = _Phase.VNC_AUTH if message[0] == SECURITY_VNC else _Phase.CLIENT_INIT
        elif phase is _Phase.VNC_AUTH:
            self._phase = _Phase.CLIENT_INIT
        elif phase is _Phase.CLIENT_INIT:
            self._phase = _Phase.MESSAGES
        elif message[0] in INPUT:
            self.dropped += 1
            if message[0] == CUT_TEXT:
                length = abs(struct.unpack_from(">i", message, 4)[0])  # negative: the extended clipboard's form
                if length > MAX_CUT_TEXT:
                    raise ProtocolViolation(f"ClientCutText of {length} bytes (at most {MAX_CUT_TEXT})")
                self._skip = length
            elif message[0] == GII:  # its length in the byte order bit 7 of the second byte names
                self._skip = int.from_bytes(message[2:4], "big" if message[1] & 0x80 else "little")
            return b""
        return message
