"""Every connection and DNS query a guest makes, seen from the host side of its tap (`--log-requests`).

The guest cannot hide from this: the capture is an AF_PACKET socket in the owner's process, bound to the
session's tap, reading each frame the guest sends before the firewall sees it (so what the firewall drops
is listed too). What counts as a request:

    dns   a DNS query (its name and type, and the server asked), over UDP port 53
    tcp   a new TCP connection (a SYN), by destination address and port
    udp   a UDP flow other than DNS (QUIC, NTP, mDNS, ...), by destination address and port
    icmp  an ICMP message (ping), by destination
    ip    any other IPv4 protocol, by destination; ipv6: any IPv6 packet (dispo guests have IPv6 off)
    other a frame that is neither IPv4, IPv6 nor ARP

ARP is not a request (it only finds the gateway), nor RARP: after a restore from a template the VMM announces
the guest's MAC with RARP frames (QEMU's self-announce), which ask nothing of anyone. Repeats count in
`count`: distinct source ports (and DNS ids), so a retransmitted SYN is one connection. Everything from the
guest is hostile data: names are escaped to printable ASCII here, and the number of distinct entries is capped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ETH_P_ALL = 0x0003
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_RARP, ETH_P_8021Q = 0x0800, 0x86DD, 0x0806, 0x8035, 0x8100
PACKET_OUTGOING = 4  # sll_pkttype of frames the host sends into the tap (to the guest): not the guest's
MAX_ENTRIES = 1000   # distinct requests kept; the rest only counted
MAX_REPEATS = 10000  # distinct (port, id) pairs remembered per entry
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
          64: "SVCB", 65: "HTTPS", 255: "ANY"}


@dataclass
class Request:
    kind: str             # dns | tcp | udp | icmp | ip | ipv6 | other
    dest: str             # the address the guest sent to ("" for other)
    port: int = 0
    name: str = ""        # dns: the name asked for (escaped)
    qtype: str = ""       # dns: A, AAAA, HTTPS, ...
    count: int = 0
    first_s: float = 0.0  # seconds after the capture started
    _seen: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dest": self.dest, "port": self.port or None, "name": self.name or None,
                "qtype": self.qtype or None, "count": self.count, "first_s": round(self.first_s, 3)}


def describe(r: dict[str, Any]) -> str:
    """One line for a request (as in `to_json`): what a person reads at the end of `dispo run --log-requests`."""
    times = f" x{r['count']}" if r.get("count", 1) > 1 else ""
    if r["kind"] == "dns":
        return f"dns {r.get('qtype') or '?'} {r.get('name') or '.'} (asked {r['dest']}){times}"
    where = f"{r['dest']}:{r['port']}" if r.get("port") else r["dest"]
    return f"{r['kind']} {where}{times}"


def dns_question(payload: bytes) -> tuple[int, str, str] | None:
    """(id, name, type) of the first question of a DNS query, or None when it is not one."""
    if len(payload) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", payload[:6])
    if flags & 0x8000 or qdcount < 1:  # a response, or no question
        return None
    labels: list[str] = []
    i = 12
    while i < len(payload):
        n = payload[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0 or i + n > len(payload) or len(labels) >= 127:
            return None  # compression in a question, or truncated: not a query we can read
        labels.append(_printable(payload[i:i + n]))
        i += n
    else:
        return None
    if i + 4 > len(payload):
        return None
    qtype = struct.unpack("!H", payload[i:i + 2])[0]
    return qid, ".".join(labels)[:255], QTYPES.get(qtype, f"TYPE{qtype}")


def _printable(raw: bytes) -> str:
    return "".join(chr(b) if 0x21 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


class RequestLog:
    """A running capture on one interface: `start()`, then `requests()` at any time, `stop()` at the end."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self._entries: dict[tuple[str, str, int, str, str], Request] = {}
        self.dropped = 0  # requests not kept (past MAX_ENTRIES)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((self.ifname, 0))
            sock.settimeout(0.2)
        except OSError:
            sock.close()
            raise
        self._sock, self._t0 = sock, time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"dispo-capture-{self.ifname}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            found = sorted(self._entries.values(), key=lambda r: r.first_s)
            return [r.to_json() for r in found]

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return  # the tap went away (the session's teardown)
            if addr[2] == PACKET_OUTGOING:
                continue
            self.note(frame)

    def note(self, frame: bytes) -> None:
        """Account one Ethernet frame the guest sent."""
        if len(frame) < 14:
            return
        ethertype = struct.unpack("!H", frame[12:14])[0]
        body = frame[14:]
        if ethertype == ETH_P_8021Q and len(body) >= 4:
            ethertype, body = struct.unpack("!H", body[2:4])[0], body[4:]
        if ethertype in (ETH_P_ARP, ETH_P_RARP):
            return
        if ethertype == ETH_P_IP:
            self._ipv4(body)
        elif ethertype == ETH_P_IPV6:
            dest = str(ipaddress.IPv6Address(body[24:40])) if len(body) >= 40 else "?"
            self._add("ipv6", dest)
        else:
            self._add("other", f"ethertype 0x{ethertype:04x}")

    def _ipv4(self, p: bytes) -> None:
        if len(p) < 20:
            return
        ihl = (p[0] & 0x0F) * 4
        proto = p[9]
        dest = str(ipaddress.IPv4Address(p[16:20]))
        frag = struct.unpack("!H", p[6:8])[0] & 0x1FFF
        seg = p[ihl:]
        if frag:  # a later fragment has no ports: its first fragment was counted
            return
        if proto == 6 and len(seg) >= 14:
            sport, dport = struct.unpack("!HH", seg[:4])
            flags = seg[13]
            if flags & 0x02 and not flags & 0x10:  # SYN without ACK: a new connection
                self._add("tcp", dest, dport, repeat=(sport, 0))
        elif proto == 17 and len(seg) >= 8:
            sport, dport = struct.unpack("!HH", seg[:4])
            q = dns_question(seg[8:]) if dport == 53 else None
            if q is not None:
                qid, name, qtype = q
                self._add("dns", dest, 53, name, qtype, repeat=(sport, qid))
            else:
                self._add("udp", dest, dport, repeat=(sport, 0))
        elif proto == 1:
            self._add("icmp", dest)
        else:
            self._add("ip", dest, proto)

    def _add(self, kind: str, dest: str, port: int = 0, name: str = "", qtype: str = "", *,
             repeat: tuple[int, int] = (0, 0)) -> None:
        key = (kind, dest, port, name, qtype)
        with self._lock:
            r = self._entries.get(key)
            if r is None:
                if len(self._entries) >= MAX_ENTRIES:
                    self.dropped += 1
                    return
                r = self._entries[key] = Request(kind, dest, port, name, qtype,
                                                 first_s=time.monotonic() - self._t0)
            if kind in ("tcp", "udp", "dns"):
                if repeat in r._seen or len(r._seen) >= MAX_REPEATS:
                    return
                r._seen.add(repeat)
            r.count += 1
