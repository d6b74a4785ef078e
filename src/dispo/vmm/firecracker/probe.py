"""The probe guest: the smallest thing Firecracker boots for real on x86_64, built in memory.

One PT_LOAD segment at 2 MiB whose 64-bit code writes a line to COM1 (port 0x3f8), then (by mode)
waits for Ctrl-Alt-Del and resets, halts forever, or resets at once. `dispo doctor` boots it to prove the
binary runs a guest here; the tests use it because a Linux guest does not boot under every KVM (nested).
"""

from __future__ import annotations

import struct
from enum import StrEnum
from pathlib import Path

LOAD_ADDR = 0x200000
GUEST_LINE = b"dispo tiny guest says hello\n"


class GuestMode(StrEnum):
    CTRL_ALT_DEL = "ctrl-alt-del"  # poll the i8042; on Ctrl-Alt-Del ask it for a reset (firecracker exits)
    HALT = "halt"                  # ignore everything: only SIGTERM/SIGKILL end it
    RESET = "reset"                # reset at once after printing: firecracker exits by itself


GUEST_BYE = b"dispo tiny guest got ctrl-alt-del\n"


def guest_code(line: bytes = GUEST_LINE, mode: GuestMode = GuestMode.CTRL_ALT_DEL) -> bytes:
    """x86_64 machine code (64-bit mode, as Firecracker enters a vmlinux): print `line` on COM1, then `mode`.

    In CTRL_ALT_DEL mode it polls the i8042 status port about once a millisecond; when a key arrives
    (Firecracker's SendCtrlAltDel) it prints GUEST_BYE and pulses the reset line, so Firecracker exits.
    """
    def lea_rsi(at: int, target: int) -> bytes:  # lea rsi,[rip+disp32]
        return b"\x48\x8d\x35" + struct.pack("<i", target - (at + 7))

    def outs(n: int) -> bytes:  # mov ecx,n ; rep outsb (dx stays 0x3f8)
        return b"\xb9" + struct.pack("<I", n) + b"\xf3\x6e"

    reset = b"\xb0\xfe\xe6\x64"   # mov al,0xfe ; out 0x64,al   (i8042: pulse the reset line)
    halt = b"\xf4\xeb\xfd"         # hlt ; jmp back to hlt
    # 0x800 pauses between polls: about a millisecond under nested KVM, where each pause exits to the host.
    poll = (b"\xb9\x00\x08\x00\x00"  # poll: mov ecx,0x800
            b"\xf3\x90\xe2\xfc"       #       pause ; loop pause
            b"\xe4\x64\xa8\x01"       #       in al,0x64 ; test al,1 (output buffer full: a key came)
            b"\x74\xf1")               #       jz poll
    head_len = 4 + 7 + 1 + 7          # mov dx,0x3f8 | lea rsi,msg | cld | mov ecx,len ; rep outsb
    bye_len = 7 + 7 if mode is GuestMode.CTRL_ALT_DEL else 0
    tail_len = {GuestMode.CTRL_ALT_DEL: len(poll) + bye_len + len(reset) + len(halt),
                GuestMode.HALT: len(halt), GuestMode.RESET: len(reset) + len(halt)}[mode]
    msg_at = head_len + tail_len
    bye_at = msg_at + len(line)
    code = b"\x66\xba\xf8\x03" + lea_rsi(4, msg_at) + b"\xfc" + outs(len(line))
    if mode is GuestMode.CTRL_ALT_DEL:
        code += poll
        code += lea_rsi(len(code), bye_at) + outs(len(GUEST_BYE)) + reset + halt
    elif mode is GuestMode.RESET:
        code += reset + halt
    else:
        code += halt
    assert len(code) == msg_at
    return code + line + (GUEST_BYE if mode is GuestMode.CTRL_ALT_DEL else b"")


def tiny_elf(path: Path, line: bytes = GUEST_LINE, mode: GuestMode = GuestMode.CTRL_ALT_DEL) -> Path:
    """Write a minimal ELF64 executable (one PT_LOAD) that Firecracker accepts as a vmlinux."""
    code = guest_code(line, mode)
    ehsize, phsize = 64, 56
    offset = 0x1000
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, little endian, version 1
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, LOAD_ADDR, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 0x1000)
    data = ehdr + phdr
    data += bytes(offset - len(data)) + code
    path.write_bytes(data)
    return path
