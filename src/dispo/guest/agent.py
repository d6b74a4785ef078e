"""The host side of the guest agent (agent.pl in the guest). Its answer is what makes a guest ready; a clone
restored from a template gets its own identity from it before any user traffic (fresh entropy and an RNG
reseed, the host's clock, its own hostname, new SSH host and client keys, its own network address), in one
request; and a session's command runs through it (`AgentCommand`), its stdio and exit status framed over
the channel, with no SSH on the way.

The channel is host-only (virtio-serial under QEMU, vsock under Firecracker: `Vmm.agent()`). The protocol is
one ASCII line per request and one per reply, then frames while a command runs, documented in agent.pl and
docs/templates.md. The guest is hostile: a reply is read with a size cap, must be printable ASCII, and is only
ever compared, never run; a frame's length is checked before its data is read, its type must be one the guest
may send at that point, and a command's output is capped before it is handed on (its consumer escapes it
before any terminal sees it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dispo.errors import AgentError

PROTOCOL = 2
MAX_REPLY = 512          # bytes of one reply line
ENTROPY_BYTES = 64       # host entropy handed to each clone (credited, then the CRNG is reseeded)
HELLO_EVERY_S = 0.5      # a hello is resent this often until the agent answers (the port may not be open yet)
MAX_COMMAND = 65536      # bytes of a command the agent runs (agent.pl's $MAX_COMMAND); longer ones go by SSH
MAX_FRAME = 32768        # bytes of one frame's data, both ways (agent.pl's $MAX_FRAME)
LOST = 255               # a command's status when its channel broke (as ssh's own failure status)
_STATUS = re.compile(rb"(?:0|[1-9][0-9]{0,2}|s[1-9][0-9]?)")


@dataclass
class AgentLink:
    sock: socket.socket
    _buf: bytes = b""
    _sending: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        self.sock.close()

    def _line(self, deadline: float) -> str | None:
        """The next reply line, or None when `deadline` passes first."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, HELLO_EVERY_S))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise AgentError("the guest's agent closed its channel")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY and b"\n" not in self._buf[:MAX_REPLY]:
                raise AgentError("the guest's agent sent an over-long reply")
        raw, self._buf = self._buf.split(b"\n", 1)
        if len(raw) > MAX_REPLY or not all(0x20 <= c < 0x7F for c in raw):
            raise AgentError("the guest's agent sent a reply that is not printable ASCII")
        return raw.decode("ascii")

    def hello(self, timeout: float, alive: Callable[[], bool], *, too_old_ok: bool = False) -> bool:
        """Until the agent answers our latest token (stale answers to earlier tries are skipped): True. An agent
        that answers in another protocol (an image built by an older dispo): AgentError, or False with
        `too_old_ok`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise AgentError("the guest stopped before its agent answered")
            token = secrets.token_hex(8)
            self.sock.sendall(f"hello {PROTOCOL} {token}\n".encode())
            wait_until = min(deadline, time.monotonic() + HELLO_EVERY_S * 4)
            while (line := self._line(wait_until)) is not None:
                if line == f"ok dispo-agent {PROTOCOL} {token}":
                    return True
                if line.startswith("err "):  # only hellos were sent: this agent does not know ours
                    if too_old_ok:
                        return False
                    raise AgentError(f"the guest's agent does not speak protocol {PROTOCOL} ({line[:100]})",
                                      hint="rebuild the image with this dispo ('dispo image build NAME --force')")
        raise AgentError(f"the guest's agent did not answer within {timeout:.0f} s",
                         hint="the template's image may predate the agent: rebuild the image, then the template")

    def request(self, line: str, timeout: float = 30.0) -> str:
        """Send one request; its reply's data ("" for a bare ok). AgentError on "err" or silence."""
        verb = line.split(" ", 1)[0]
        with self._sending:
            self.sock.sendall(line.encode("ascii") + b"\n")
        reply = self._line(time.monotonic() + timeout)
        if reply is None:
            raise AgentError(f"the guest's agent did not answer {verb!r} within {timeout:.0f} s")
        if reply == "ok" or reply.startswith("ok "):
            return reply[3:]
        raise AgentError(f"the guest's agent refused {verb!r}: {reply[:200]}")


def step_clock(link: AgentLink) -> None:
    now = time.time_ns()
    link.request(f"clock {now // 1_000_000_000} {now % 1_000_000_000}")


@dataclass(frozen=True)
class NewIdentity:
    hostname: str
    mac: str
    address: str            # a.b.c.d/prefix
    gateway: str
    dns: tuple[str, ...]
    host_key: bytes         # the OpenSSH private host key file
    user_key: str           # the authorized_keys line


def identity_request(new: NewIdentity, now_ns: int, entropy: bytes) -> str:
    """The one `identity` line (agent.pl checks every word before it applies any)."""
    return " ".join(("identity", new.hostname, new.mac, new.address, new.gateway, ",".join(new.dns) or "-",
                     str(now_ns // 1_000_000_000), str(now_ns % 1_000_000_000), entropy.hex(), new.host_key.hex(),
                     new.user_key.strip().encode().hex()))


def give(link: AgentLink, new: Callable[[], NewIdentity], *, timeout: float,
         alive: Callable[[], bool]) -> dict[str, float]:
    """Hand a restored guest its identity in one request, handled inside the agent (entropy first, the network
    last: agent.pl), once the agent answered; `new` is called meanwhile (the host makes the keys while the guest
    wakes). Seconds per step (the hello, the identity)."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    with ThreadPoolExecutor(1, thread_name_prefix="dispo-identity") as ex:
        made = ex.submit(new)
        link.hello(timeout, alive)
        identity = made.result()
    timings["hello"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    link.request(identity_request(identity, time.time_ns(), os.urandom(ENTROPY_BYTES)))
    timings["identity"] = round(time.monotonic() - t, 3)
    return timings


OutputSink = Callable[[str, bytes], None]  # (stream name, bytes)


class AgentCommand:
    """A command run in the guest by its agent (`run`), the host's half of it: a thread reads the guest's
    frames (stdout and stderr handed to `output` up to `cap` bytes in all, the rest read and dropped so the
    guest never blocks; then its exit status), another sends `stdin_fd`'s bytes (None: stdin is closed at
    once). No process on the host. The link is the command's until it ends; `poll` and `stop` as a process';
    `on_over` is called once the exit status is in (or the channel broke).
    """

    def __init__(self, link: AgentLink, command: str, *, output: OutputSink, cap: int,
                 stdin_fd: int | None = None, timeout: float = 30.0,
                 on_over: Callable[[], None] | None = None) -> None:
        data = command.encode()
        if not data or len(data) > MAX_COMMAND or b"\0" in data:
            raise AgentError(f"the agent runs commands of 1 to {MAX_COMMAND} bytes without NUL")
        self.link = link
        self.error = ""  # why the run broke, when it did
        self._output, self._room = output, cap
        self._rc: int | None = None
        self._over = threading.Event()  # the run is over (the exit status came, or the channel broke)
        self._said_done = False         # "z" went out: nothing may follow it (the channel is lines again)
        self._on_over = on_over         # told once the run is over (the session's watcher looks at once)
        link.request(f"run {data.hex()}", timeout=timeout)
        self._threads = [threading.Thread(target=self._read, daemon=True, name="dispo-agent-out")]
        if stdin_fd is None:
            self._send(b"c")
        else:
            self._threads.append(threading.Thread(target=self._write, args=(stdin_fd,), daemon=True,
                                                  name="dispo-agent-in"))
        for t in self._threads:
            t.start()

    def _send(self, kind: bytes, data: bytes = b"") -> bool:
        """One frame to the guest, whole (the two threads share the socket); False once the run is over."""
        with self.link._sending:
            if self._said_done or (self._over.is_set() and kind != b"z"):
                return False
            self._said_done = kind == b"z"
            try:
                self.link.sock.sendall(kind + struct.pack(">H", len(data)) + data)
            except OSError:
                return False
        return True

    def _exact(self, n: int) -> bytes | None:
        """`n` bytes of the guest's, or None when the run was stopped."""
        link = self.link
        while len(link._buf) < n:
            if self._over.is_set():
                return None
            link.sock.settimeout(0.5)
            try:
                chunk = link.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise AgentError("the guest's agent closed its channel while the command ran")
            link._buf += chunk
        got, link._buf = link._buf[:n], link._buf[n:]
        return got

    def _read(self) -> None:
        rc = LOST
        try:
            while (head := self._exact(3)) is not None:
                kind, size = head[:1], struct.unpack(">H", head[1:])[0]
                if size > MAX_FRAME:
                    raise AgentError(f"the guest's agent sent a frame of {size} bytes (at most {MAX_FRAME})")
                if kind not in (b"o", b"e", b"x"):
                    raise AgentError(f"the guest's agent sent a frame of unknown type {kind!r}")
                body = self._exact(size)
                if body is None:
                    break
                if kind == b"x":
                    if not _STATUS.fullmatch(body) or (body[:1] != b"s" and int(body) > 255):
                        raise AgentError("the guest's agent sent an exit status that is none")
                    # Killed by a signal: ssh's status for it, 255.
                    rc = LOST if body.startswith(b"s") else int(body)
                    self._send(b"z")  # the run is over for both sides (the channel goes back to lines)
                    break
                if self._room > 0:
                    part = body[:self._room]
                    self._room -= len(part)
                    self._output("stdout" if kind == b"o" else "stderr", part)
        except (AgentError, OSError) as e:
            self.error = e.message if isinstance(e, AgentError) else f"the agent's channel failed: {e}"
        finally:
            self._rc = rc
            self._over.set()
            if self._on_over is not None:
                self._on_over()

    def _write(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            while not self._over.is_set():
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                chunk = os.read(fd, MAX_FRAME)
                if not chunk:
                    break
                if not self._send(b"i", chunk):
                    return
        self._send(b"c")

    def poll(self) -> int | None:
        """The exit status once the command ended and its output was all delivered."""
        if not self._over.is_set():
            return None
        self._threads[0].join(5)
        return self._rc

    def stop(self) -> None:
        """End the run: the command is killed (its process group), the channel closed."""
        if not self._over.is_set():
            self._send(b"k")
            self._over.set()
        for t in self._threads:
            t.join(2)
        self.link.close()


def run_to_end(link: AgentLink, command: str, timeout: float) -> int:
    """Run `command` in the guest through the agent, its output dropped; its exit status (AgentError when it
    does not end within `timeout` or the channel breaks)."""
    what = command.split(maxsplit=1)[0]
    done = threading.Event()
    cmd = AgentCommand(link, command, output=lambda name, data: None, cap=0, timeout=timeout, on_over=done.set)
    try:
        if not done.wait(timeout):
            raise AgentError(f"the guest's {what!r} did not end within {timeout:.0f} s")
        rc = cmd.poll()
        if cmd.error or rc is None:
            raise AgentError(cmd.error or f"the guest's {what!r} did not end")
        return rc
    finally:
        if not done.is_set():
            cmd.stop()
