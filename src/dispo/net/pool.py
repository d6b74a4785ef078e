"""The address pool and its leases: one small subnet per session, safe against concurrent dispo processes.

Leases are files under <state_dir>/net/leases/, one per subnet, named after the subnet ("172.20.0.4-30"),
created with O_EXCL while holding an flock on <state_dir>/net/lock. The lease names its session; the
session's journal records "net-lease" before the file exists, so teardown and `dispo gc` free it.

The same lock (`net_lock`) is held across the whole of a session's network bring-up (lease, nftables rules,
link: `attach_network`) and across the orphan sweep (`orphans.sweep`), so a sweep never sees a session half
made. It is re-entrant within a thread; between threads and processes it excludes. The nftables table shared
by every state dir of a network namespace has a lock of its own (firewall.table_lock), always taken inside
this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dispo.config import NetConfig
from dispo.errors import ConfigError, NetworkError, PermissionProblem

MIN_PREFIX = 24
MAX_PREFIX = 30  # a /30 holds exactly a gateway and a guest


@dataclass(frozen=True)
class Pool:
    network: ipaddress.IPv4Network
    prefix: int

    @classmethod
    def from_config(cls, net: NetConfig) -> Pool:
        try:
            network = ipaddress.IPv4Network(net.pool, strict=True)
        except ValueError as e:
            raise ConfigError(f"net.pool {net.pool!r} is not an IPv4 network: {e}",
                              hint="write it in CIDR form, e.g. 172.20.0.0/16") from None
        if not MIN_PREFIX <= net.prefix <= MAX_PREFIX:
            raise ConfigError(f"net.prefix {net.prefix} is out of range",
                              hint=f"use a per-session subnet size from /{MIN_PREFIX} to /{MAX_PREFIX}")
        if network.prefixlen > net.prefix:
            raise ConfigError(f"net.pool {network} is too small for even one /{net.prefix} session subnet",
                              hint=f"use a pool of /{net.prefix} or larger, e.g. 172.20.0.0/16")
        return cls(network, net.prefix)

    @property
    def capacity(self) -> int:
        return int(2 ** (self.prefix - self.network.prefixlen))

    def subnets(self) -> Iterator[ipaddress.IPv4Network]:
        return self.network.subnets(new_prefix=self.prefix)


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network
    session_id: str
    netns: int  # inode of the network namespace the session's link lives in
    created: float
    path: Path

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())

    @property
    def guest(self) -> ipaddress.IPv4Interface:
        hosts = self.subnet.hosts()
        next(hosts)
        return ipaddress.IPv4Interface(f"{next(hosts)}/{self.subnet.prefixlen}")


def net_dir(state_dir: Path) -> Path:
    return state_dir / "net"


def leases_dir(state_dir: Path) -> Path:
    return net_dir(state_dir) / "leases"


def _lease_name(subnet: ipaddress.IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


_held = threading.local()  # lock paths this thread holds: net_lock is re-entrant within a thread


@contextlib.contextmanager
def net_lock(state_dir: Path) -> Iterator[None]:
    """Exclusive lock of the state dir's network: leases, a session's bring-up, the orphan sweep."""
    d = net_dir(state_dir)
    key = os.path.abspath(d)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    try:
        leases_dir(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError as e:
        raise PermissionProblem(f"cannot use {d}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)


def read_leases(state_dir: Path) -> list[Lease]:
    d = leases_dir(state_dir)
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
            out.append(Lease(ipaddress.IPv4Network(data["subnet"]), str(data["session"]), int(data["netns"]),
                             float(data["created"]), path))
        except FileNotFoundError:
            continue  # freed while we were listing
        except (OSError, ValueError, KeyError):
            # A half-written lease (crash between create and write) still reserves its subnet by name.
            with contextlib.suppress(ValueError):
                subnet = ipaddress.IPv4Network(path.name.replace("-", "/"))
                out.append(Lease(subnet, "", 0, path.stat().st_mtime, path))
    return out


def _leased_ranges(state_dir: Path) -> list[tuple[int, int]]:
    """(first, last) address of each leased subnet, as integers, from the lease files' names alone (a
    half-written lease reserves its subnet too)."""
    d = leases_dir(state_dir)
    out = []
    for name in os.listdir(d) if d.is_dir() else ():
        address, _, prefix = name.partition("-")
        try:
            start, bits = int.from_bytes(socket.inet_aton(address), "big"), int(prefix)
        except (OSError, ValueError):
            continue
        if name.startswith(".") or not 0 <= bits <= 32:
            continue
        out.append((start, start + 2 ** (32 - bits) - 1))
    return out


def allocate(state_dir: Path, pool: Pool, session_id: str, netns: int) -> Lease:
    """Take the first free subnet of the pool. The caller has journaled "net-lease" for session_id."""
    with net_lock(state_dir):
        # Integer ranges: comparing ipaddress objects costs milliseconds once tens of sessions are up.
        taken = sorted(_leased_ranges(state_dir))
        size = 2 ** (32 - pool.prefix)
        first, last = int(pool.network.network_address), int(pool.network.broadcast_address)
        start = first
        for lo, hi in taken:
            if start + size - 1 < lo:
                break  # the gap before this lease holds a subnet
            start = max(start, first + -(-(hi + 1 - first) // size) * size)  # the next aligned start after it
        if start + size - 1 <= last:
            subnet = ipaddress.IPv4Network((start, pool.prefix))
            path = leases_dir(state_dir) / _lease_name(subnet)
            lease = Lease(subnet, session_id, netns, time.time(), path)
            data = {"subnet": str(subnet), "session": session_id, "netns": netns, "created": lease.created}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            return lease
    raise NetworkError(f"address pool {pool.network} is full ({len(taken)} subnets leased)",
                       hint="end some sessions, run 'dispo gc' to reclaim dead ones, or configure a larger net.pool")


def release(state_dir: Path, session_id: str) -> None:
    """Free every lease of session_id (idempotent)."""
    needle = json.dumps(session_id).encode()
    d = leases_dir(state_dir)
    for name in os.listdir(d) if d.is_dir() else ():
        path = d / name
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        # Only a lease that names the session is decoded: tens of JSON parses per teardown add up.
        if name.startswith(".") or needle not in raw:
            continue
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(raw).get("session") == session_id:
                path.unlink(missing_ok=True)


def mac_for(guest: ipaddress.IPv4Address) -> str:
    """06:00 + the four bytes of the guest address: locally administered, unicast, unique per lease."""
    return ":".join(f"{b:02x}" for b in (0x06, 0x00, *guest.packed))
