"""Network devices through netlink: the session's tap (rtnl.py: the tun device's ioctls and raw rtnetlink, no
process) or its test stand-in veth (pyroute2), and host facts.

Everything here acts on the network namespace the calling process is in. Links carry the session id in
their name ("dsp-<id>", 12 characters, within IFNAMSIZ) and an alias naming dispo, the session and the
state directory (`alias_for`), so an orphan sweep can tell its own leftovers from another dispo's; the same
string is the comment on the session's nftables chains and map elements, and the alias of the loopback
device in a test stand-in namespace.

Every link gets strict reverse-path filtering (`rp_filter=1`) when it is made. The kernel applies the larger
of the link's value and `all`'s, so a host with loose filtering (`all` = 2) keeps it loose: the firewall's
prerouting rule (firewall.py) is what holds there; the sysctl is the second wall where the host allows it.

Every link also answers ARP only for its own address, and only to its own subnet (`arp_ignore=2`), and names
only its own address in the ARP requests it sends (`arp_announce=2`): by default Linux answers for all of the
host's addresses on any link, which would tell a guest the host's LAN and uplink addresses. The kernel applies
the larger of the link's value and `all`'s, so these never loosen a stricter host.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dispo.errors import NetworkError, PermissionProblem
from dispo.infra.proc import run
from dispo.net import rtnl
from dispo.net.rtnl import Rtnl

if TYPE_CHECKING:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

LINK_PREFIX = "dsp-"
STANDIN_NETNS_PREFIX = "dispo-vmstandin-"
STANDIN_GUEST_IFNAME = "eth0"
AF_INET = 2
NETNS_DIR = Path("/run/netns")


def link_name(session_id: str) -> str:
    return f"{LINK_PREFIX}{session_id}"


def standin_netns_name(session_id: str) -> str:
    return f"{STANDIN_NETNS_PREFIX}{session_id}"


# nftables comments hold at most 128 characters; "dispo session <8 hex> state " takes 29 of them.
_OWNER_MAX = 96


def owner_tag(state_dir: Path) -> str:
    """How objects name the state directory they belong to: its path when that is short and plain (readable in
    `ip link` and `nft list ruleset`), otherwise "sha256:" and 16 hex digits of the path."""
    text = str(state_dir)
    if len(text) <= _OWNER_MAX and text.isascii() and text.isprintable() and not any(c in text for c in '"\\'):
        return text
    return "sha256:" + hashlib.sha256(os.fsencode(text)).hexdigest()[:16]


def alias_for(session_id: str, state_dir: Path) -> str:
    """The owner mark of a session's objects: link alias, nftables comment, stand-in loopback alias."""
    return f"dispo session {session_id} state {owner_tag(state_dir)}"


def current_netns() -> int:
    """Inode of this process's network namespace: recorded so an undo never acts in the wrong one."""
    return os.stat("/proc/self/ns/net").st_ino


def netns_path(inode: int) -> Path | None:
    """A path to the network namespace with this inode (a name under /run/netns, or a process holding it),
    or None when it no longer exists."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        candidates += sorted(NETNS_DIR.iterdir())
    with contextlib.suppress(OSError):
        candidates += (p / "ns" / "net" for p in Path("/proc").iterdir() if p.name.isdigit())
    for path in candidates:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                return path
    return None


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    # Imported here: pyroute2 takes about half a second to import, and only the listings and the test
    # stand-in use it (a session's own link goes through rtnl.py).
    from pyroute2 import IPRoute

    try:
        ipr = IPRoute()
    except PermissionError:
        raise PermissionProblem("cannot open a netlink socket") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _netlink_error(what: str, e: Exception) -> NetworkError | PermissionProblem:
    if getattr(e, "code", None) == errno.EPERM:
        return PermissionProblem(f"{what}: operation not permitted")
    return NetworkError(f"{what}: {e.args[-1] if e.args else e}")


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    kind: str
    alias: str
    addresses: tuple[ipaddress.IPv4Interface, ...]


def list_links() -> list[LinkInfo]:
    with _ipr() as ipr:
        addrs: dict[int, list[ipaddress.IPv4Interface]] = {}
        for a in ipr.get_addr(family=AF_INET):
            addrs.setdefault(a["index"], []).append(
                ipaddress.IPv4Interface(f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
        out = []
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
            out.append(LinkInfo(link.get_attr("IFLA_IFNAME"), link["index"], kind or "",
                                link.get_attr("IFLA_IFALIAS") or "", tuple(addrs.get(link["index"], ()))))
        return out


def dispo_links() -> list[LinkInfo]:
    return [link for link in list_links() if link.name.startswith(LINK_PREFIX)]


@dataclass(frozen=True)
class HostView:
    """What attach_network checks, from one netlink dump each of links, addresses and routes."""

    names: tuple[str, ...]  # every link but dispo's
    default_interface: str | None  # where the IPv4 default route goes
    networks: tuple[tuple[str, ipaddress.IPv4Network], ...]  # (interface, network): addresses and routes


def _main_routes() -> list[tuple[str, ipaddress.IPv4Network]]:
    # /proc/net/route (the main table of this netns) is read in microseconds; a netlink route dump parsed by
    # pyroute2 costs milliseconds per hundred routes, and every session adds one (skipped here unparsed).
    out = []
    with open("/proc/net/route") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[0].startswith(LINK_PREFIX):
                continue
            dst, mask = (struct.unpack("<I", struct.pack(">I", int(x, 16)))[0] for x in (fields[1], fields[7]))
            out.append((fields[0], ipaddress.IPv4Network((dst & mask, bin(mask).count("1")))))
    return out


def host_view() -> HostView:
    # Dispo's own links are skipped unparsed (tens of them, one per session). Then addresses and routes, and
    # names after them: a link another dispo creates meanwhile is then still named (and excluded as dispo's);
    # one deleted meanwhile has no name and is skipped.
    skip = frozenset(i for i, n in socket.if_nameindex() if n.startswith(LINK_PREFIX))
    try:
        with Rtnl() as nl:
            addrs = nl.ipv4_addresses(skip)
    except OSError as e:
        raise NetworkError(f"cannot list the host's addresses: {e.strerror or e}") from None
    routes = _main_routes()
    names = dict(socket.if_nameindex())
    found = [(names.get(i, ""), net) for i, net in addrs if not names.get(i, "").startswith(LINK_PREFIX)] + routes
    default = next((n for n, net in routes if net.prefixlen == 0 and not n.startswith(LINK_PREFIX)), None)
    return HostView(
        names=tuple(n for n in names.values() if not n.startswith(LINK_PREFIX)),
        default_interface=default,
        networks=tuple((n, net) for n, net in found
                       if n and net.prefixlen > 0 and not n.startswith(LINK_PREFIX)),
    )


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def delete_link(name: str) -> None:
    """Remove a link by name if it exists (idempotent): one rtnetlink request. Deleting one end of a veth
    removes both."""
    try:
        rtnl.delete_link_behind(name)  # returns once it is gone; the kernel's own cleanup goes on behind
    except OSError as e:
        raise _os_error(f"cannot delete {name}", e) from None


def _os_error(what: str, e: OSError) -> NetworkError | PermissionProblem:
    if e.errno == errno.EPERM:
        return PermissionProblem(f"{what}: operation not permitted")
    return NetworkError(f"{what}: {e.strerror or e}")


def _disable_ipv6(name: str) -> None:
    # The guest only gets IPv4; an IPv6 link-local address on the tap would be an unfiltered way to the host.
    with contextlib.suppress(FileNotFoundError):
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")


def _strict_rp_filter(name: str) -> None:
    # Strict reverse-path filtering: a packet from the guest whose source does not route back through this link
    # is dropped by the kernel (unless conf/all/rp_filter is 2, which wins; see the module docstring).
    try:
        Path(f"/proc/sys/net/ipv4/conf/{name}/rp_filter").write_text("1\n")
    except OSError as e:
        raise NetworkError(f"cannot set strict reverse-path filtering on {name}: {e.strerror}") from None


def _quiet_arp(name: str) -> None:
    # See the module docstring: the guest learns only its gateway's address from ARP.
    for key, value in (("arp_ignore", "2"), ("arp_announce", "2")):
        try:
            Path(f"/proc/sys/net/ipv4/conf/{name}/{key}").write_text(f"{value}\n")
        except OSError as e:
            raise NetworkError(f"cannot set {key} on {name}: {e.strerror}") from None


def create_tap(name: str, gateway: ipaddress.IPv4Interface, alias: str) -> None:
    """A persistent tap owned by root, single queue, no packet info header, with the gateway address: the tun
    device's ioctls, then three rtnetlink requests (alias, address, up), no process started."""
    delete_link(name)  # a leftover from a crash under the same session id
    try:
        index = rtnl.make_persistent_tap(name, owner=0)
        with Rtnl() as nl:
            nl.set_link(index, alias=alias)  # the owner mark first, so a sweep can tell whose it is
            _disable_ipv6(name)
            _strict_rp_filter(name)
            _quiet_arp(name)
            nl.add_address(index, gateway)
            nl.set_link(index, up=True)
    except OSError as e:
        raise _os_error(f"cannot create tap {name}", e) from None


def create_standin(name: str, gateway: ipaddress.IPv4Interface, alias: str, *, guest_ns: str,
                   guest: ipaddress.IPv4Interface, mac: str) -> None:
    """Test stand-in for a VM: veth `name` whose far end, in netns `guest_ns`, is configured like the guest's
    early boot would configure its NIC from the kernel arguments (address, MAC, default route)."""
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    delete_link(name)
    with _ipr() as ipr:
        try:
            ipr.link("add", ifname=name, kind="veth",
                     peer={"ifname": STANDIN_GUEST_IFNAME, "net_ns_fd": guest_ns, "address": mac})
            _configure_host_side(ipr, name, gateway, alias)
        except NetlinkError as e:
            raise _netlink_error(f"cannot create stand-in veth {name}", e) from None
    # The far side is configured with `ip -n` (a process of its own): pyroute2's netns helpers fork this
    # process, and a forked copy of dispo must never exist (it would carry the open session along).
    ip = ["ip", "-n", guest_ns]
    for argv in (["link", "set", "lo", "up"],
                 ["addr", "add", guest.with_prefixlen, "dev", STANDIN_GUEST_IFNAME],
                 ["link", "set", STANDIN_GUEST_IFNAME, "up"],
                 ["route", "add", "default", "via", str(gateway.ip)]):
        run([*ip, *argv], hint="install iproute2")


def _configure_host_side(ipr: IPRoute, name: str, gateway: ipaddress.IPv4Interface, alias: str) -> None:
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, ifalias=alias)
    _disable_ipv6(name)
    _strict_rp_filter(name)
    _quiet_arp(name)
    ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
    ipr.link("set", index=index, state="up")


def create_netns(name: str, alias: str = "") -> None:
    """A named network namespace; `alias` (the owner mark) goes on its loopback device right away, so an orphan
    sweep of another state directory never takes it for its own. (Unmarked, it is nobody's and no sweep removes
    it: a crash in the milliseconds between the two steps leaves one for `ip netns del`.)"""
    remove_netns(name)
    run(["ip", "netns", "add", name], hint="install iproute2")
    if alias:
        run(["ip", "-n", name, "link", "set", "lo", "alias", alias], hint="install iproute2")


def netns_alias(name: str) -> str:
    """The owner mark on the loopback device of namespace `name` ("" when unmarked or gone)."""
    proc = run(["ip", "-n", name, "-j", "link", "show", "dev", "lo"], check=False, hint="install iproute2")
    if proc.returncode != 0:
        return ""
    try:
        return str(json.loads(proc.stdout)[0].get("ifalias", ""))
    except (ValueError, IndexError, AttributeError):
        return ""


def remove_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "del", name], hint="install iproute2")


def list_standin_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(STANDIN_NETNS_PREFIX))


def ip_forward_enabled() -> bool:
    try:
        return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    except OSError:
        return False
