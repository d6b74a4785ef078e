"""The host side of the identity agent (agent.pl in the guest): a clone restored from a template gets its own
identity from it before any user traffic: fresh entropy and an RNG reseed, the host's clock, its own
hostname, new SSH host and client keys, and its own network address.

The channel is host-only (virtio-serial under QEMU, vsock under Firecracker: `Vmm.agent()`). The protocol is
one ASCII line per request and one per reply, documented in agent.pl and docs/templates.md. The guest is
hostile: a reply is read with a size cap, must be printable ASCII, and is only ever compared, never run.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dispo.errors import AgentError

MAX_REPLY = 512          # bytes of one reply line
ENTROPY_BYTES = 64       # host entropy handed to each clone (credited, then the CRNG is reseeded)
HELLO_EVERY_S = 0.5      # a hello is resent this often until the agent answers (the port may not be open yet)


@dataclass
class AgentLink:
    sock: socket.socket
    _buf: bytes = b""

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

    def hello(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Until the agent answers our latest token (stale answers to earlier tries are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise AgentError("the guest stopped before its agent answered")
            token = secrets.token_hex(8)
            self.sock.sendall(f"hello 1 {token}\n".encode())
            wait_until = min(deadline, time.monotonic() + HELLO_EVERY_S * 4)
            while (line := self._line(wait_until)) is not None:
                if line == f"ok dispo-agent 1 {token}":
                    return
        raise AgentError(f"the guest's agent did not answer within {timeout:.0f} s",
                         hint="the template's image may predate the agent: rebuild the image, then the template")

    def request(self, line: str, timeout: float = 30.0) -> str:
        """Send one request; its reply's data ("" for a bare ok). AgentError on "err" or silence."""
        verb = line.split(" ", 1)[0]
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


def give(link: AgentLink, new: NewIdentity, *, timeout: float, alive: Callable[[], bool]) -> dict[str, float]:
    """Hand a restored guest its identity, in the order that matters: the RNG first (everything after it,
    the sshd restart included, draws from reseeded randomness), the network last (the guest has no working
    address before, so nothing of the user's reaches it under the template's). Seconds per request."""
    timings: dict[str, float] = {}

    def step(name: str, line: str) -> None:
        t = time.monotonic()
        link.request(line)
        timings[name] = round(time.monotonic() - t, 3)

    t = time.monotonic()
    link.hello(timeout, alive)
    timings["hello"] = round(time.monotonic() - t, 3)
    step("entropy", f"entropy {os.urandom(ENTROPY_BYTES).hex()}")
    t = time.monotonic()
    step_clock(link)
    timings["clock"] = round(time.monotonic() - t, 3)
    step("hostname", f"hostname {new.hostname}")
    step("host-key", f"host-key {new.host_key.hex()}")
    step("user-key", f"user-key {new.user_key.strip().encode().hex()}")
    step("net", f"net {new.mac} {new.address} {new.gateway} {','.join(new.dns) or '-'}")
    return timings
