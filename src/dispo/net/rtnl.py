"""A minimal rtnetlink client for what a session's network does on its way up and down: make a tap, give it
its alias, address and state, delete a link, and list the IPv4 addresses of the namespace.

Why not pyroute2 (which links.py still uses for the rarer listings and the test stand-in): its request path
runs an asyncio loop per call and parses every attribute of every answer, about 10-20 ms for a session's
bring-up on a loaded 2-core host, against a few hundred microseconds for the same messages sent here. Every
request waits for the kernel's acknowledgement, so an error comes back as OSError(errno) from the call that
caused it. Layouts and numbers are those of <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h> and
<linux/if_tun.h>. Everything acts on the calling thread's network namespace.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

from dispo.errors import PermissionProblem
from dispo.net.nfnl import HDR, align, attr, attrs, split, str_attr

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_GETADDR = 16, 17, 20, 22
RTMGRP_LINK = 0x1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_IFNAME, IFLA_IFALIAS = 3, 20
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP = 0x1

# <linux/if_tun.h>
TUNSETIFF, TUNSETPERSIST, TUNSETOWNER = 0x400454CA, 0x400454CB, 0x400454CC
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
TUN_DEVICE = "/dev/net/tun"

_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index


class Rtnl:
    """One rtnetlink socket in this thread's network namespace. Use as a context manager."""

    def __init__(self, groups: int = 0) -> None:
        """`groups`: multicast groups to listen to (RTMGRP_LINK: links added and removed)."""
        self._seq = 0
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                       socket.NETLINK_ROUTE)
        except PermissionError:
            raise PermissionProblem("cannot open a netlink socket") from None
        self._sock.settimeout(10)  # the kernel always answers; a stuck socket must not hang a teardown
        self._sock.bind((0, groups))

    def fileno(self) -> int:
        return self._sock.fileno()

    def link_removals(self) -> list[int]:
        """Indexes of the links whose removal (RTM_DELLINK) the kernel announced in what is waiting on this
        socket (made with groups=RTMGRP_LINK); [] when nothing is waiting."""
        out: list[int] = []
        while True:
            try:
                # MSG_DONTWAIT alone is not enough: a socket with a timeout waits for data before it reads.
                self._sock.setblocking(False)
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return out
            finally:
                self._sock.settimeout(10)
            off = 0
            while off + HDR.size <= len(data):
                length, kind, _flags, _seq, _pid = HDR.unpack_from(data, off)
                if length < HDR.size:
                    break
                if kind == RTM_DELLINK and length >= HDR.size + _IFINFO.size:
                    out.append(_IFINFO.unpack_from(data, off + HDR.size)[2])
                off += align(length)

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self._seq += 1
        self._sock.send(HDR.pack(HDR.size + len(body), kind, NLM_F_REQUEST | flags, self._seq, 0) + body)
        return self._seq

    def _messages(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, body) of the answer's messages until its end; raises OSError for a negative acknowledgement."""
        while True:
            data = self._sock.recv(1 << 16)
            for kind, _flags, mseq, body in split(data, "the kernel"):
                if mseq != seq:
                    continue  # an answer to an earlier request that was abandoned
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", body)[0]
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return
                if kind == NLMSG_DONE:
                    return
                yield kind, body

    def _call(self, kind: int, flags: int, body: bytes) -> None:
        for _ in self._messages(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    # -- links --------------------------------------------------------------------------------------------------
    def set_link(self, index: int, *, alias: str | None = None, up: bool | None = None) -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if alias is not None:
            body += attr(IFLA_IFALIAS, alias.encode())
        self._call(RTM_NEWLINK, 0, body)

    def delete_link(self, name: str) -> bool:
        """Delete the link by name; False when there is none."""
        try:
            self._call(RTM_DELLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + str_attr(IFLA_IFNAME, name))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return False
            raise
        return True

    # -- addresses ----------------------------------------------------------------------------------------------
    def add_address(self, index: int, address: ipaddress.IPv4Interface) -> None:
        packed = address.ip.packed
        body = _IFADDR.pack(socket.AF_INET, address.network.prefixlen, 0, 0, index)
        self._call(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed))

    def ipv4_addresses(self, skip: frozenset[int] = frozenset()) -> list[tuple[int, ipaddress.IPv4Network]]:
        """(link index, network) of every IPv4 address in the namespace but those of the links in `skip`."""
        out = []
        seq = self._send(RTM_GETADDR, NLM_F_DUMP, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0))
        for kind, body in self._messages(seq):
            if kind != RTM_NEWADDR or len(body) < _IFADDR.size:
                continue
            family, prefixlen, _flags, _scope, index = _IFADDR.unpack_from(body)
            if family != socket.AF_INET or index in skip:
                continue
            found = dict(attrs(body[_IFADDR.size:]))
            raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
            if raw is not None and len(raw) == 4 and prefixlen <= 32:
                # From integers: parsing text through ipaddress costs milliseconds once tens of taps are up.
                mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
                out.append((index, ipaddress.IPv4Network((int.from_bytes(raw, "big") & mask, prefixlen))))
        return out


def make_persistent_tap(name: str, owner: int = 0) -> int:
    """Create a persistent tap (single queue, no packet-info header) owned by uid `owner`; its link index.
    The tun driver makes taps only through its character device (its rtnetlink "add" refuses), with no
    process started."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETOWNER, owner)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)  # persistent: the tap stays when its creator's descriptor closes
    return socket.if_nametoindex(name)


_deleters: concurrent.futures.ThreadPoolExecutor | None = None
_deleters_lock = threading.Lock()


def delete_link_behind(name: str, timeout: float = 10.0) -> bool:
    """Delete the link `name`; return once the kernel has announced it removed (False: there was none).

    Deleting a tap blocks the deleting thread for 15-20 ms here after the link is already gone: the kernel
    unlists it (name, addresses, routes) and announces RTM_DELLINK, then, still inside the same system call,
    waits for RCU callbacks (`rcu_barrier`) before it frees the device. So the request is sent from a worker
    thread and this thread waits only for the announcement. An error of the request is raised here."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return False
    global _deleters
    with _deleters_lock:
        if _deleters is None:
            # A few workers: one deletion's wait must not hold up another session's.
            _deleters = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="link-delete")
    with Rtnl(groups=RTMGRP_LINK) as monitor:  # listening before the request: the announcement cannot be missed
        # Made here, in the caller's thread: a netlink socket acts in the network namespace of the thread that
        # made it, and the worker threads may have been started in another one.
        deleter = Rtnl()
        try:
            done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            deleter.__exit__()
            raise

        def work() -> bool:
            try:
                with deleter:
                    return deleter.delete_link(name)
            finally:
                os.eventfd_write(done, 1)

        try:
            future = _deleters.submit(work)
        except BaseException:
            os.close(done)
            deleter.__exit__()
            raise
        try:
            poller = select.poll()
            poller.register(monitor.fileno(), select.POLLIN)
            poller.register(done, select.POLLIN)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(errno.ETIMEDOUT, f"{name} was not removed within {timeout} s")
                ready = {fd for fd, _ in poller.poll(left * 1000)}
                if monitor.fileno() in ready and _removed(monitor, name, index):
                    return True
                if done in ready:
                    return future.result()  # finished (or failed) first: its answer is the answer
        finally:
            # The worker writes to `done` as it ends, maybe after this returns: closed once it has.
            future.add_done_callback(lambda _f: os.close(done))


def _removed(monitor: Rtnl, name: str, index: int) -> bool:
    try:
        return index in monitor.link_removals()
    except OSError as e:
        if e.errno != errno.ENOBUFS:
            raise
    # Announcements were lost (a burst of link changes overran the socket): ask by name instead.
    try:
        return socket.if_nametoindex(name) != index
    except OSError:
        return True
