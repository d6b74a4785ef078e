"""Per-session networking: a subnet lease, a tap named after the session, and nftables rules, all journaled.

`attach_network(session)` checks everything first (pool, upstream interface, forwarding, overlap with the
host's addresses and routes, the policy) and creates nothing if any check fails. Then, each recorded in the
journal before it exists and all under the state dir's pool lock (which the orphan sweep takes too, so it
never sees a session half made): the lease, the session's nftables chains, and the link. The journal unwinds
them in reverse (link, rules, lease). The guest learns its address from `GuestNetwork.kernel_args()`.

While the session lives, its owner asks `missing_rules(state_dir, session_id)` (watch.py) every second or two
and ends the session when its firewall rules have gone (e.g. `nft flush ruleset`): see watch.py for why.

Forwarding: dispo does not change net.ipv4.ip_forward (a namespace-wide setting other software relies on,
with no owner to give it back to); it refuses to attach a network when forwarding is off and says how to
turn it on. DNS: the guest is handed the non-loopback IPv4 resolvers of the host's /etc/resolv.conf (or
the configured list), and the firewall lets it reach exactly those on port 53; there is no DNS proxy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dispo.config import NetConfig, NetLink
from dispo.errors import ConfigError, NetworkError
from dispo.net import firewall, links
from dispo.net.policy import NetworkPolicy
from dispo.net.pool import Pool, allocate, mac_for, net_lock
from dispo.net.watch import RULES_GONE, leftover_rules, missing_rules, rules_gone_reason

if TYPE_CHECKING:
    from dispo.infra.txn import Transaction

__all__ = ["RULES_GONE", "GuestNetwork", "NetworkPolicy", "attach_network", "check_network_config", "leftover_rules",
           "missing_rules", "rules_gone_reason"]

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")


@dataclass(frozen=True)
class GuestNetwork:
    session_id: str
    tap: str  # host link "dsp-<session id>": a tap, or with net.link = veth-standin the test stand-in's veth
    mac: str
    guest: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    dns: tuple[ipaddress.IPv4Address, ...]
    standin_netns: str = ""  # only with net.link = veth-standin: the netns standing in for the VM

    def kernel_args(self) -> tuple[str, ...]:
        args = [f"dispo.ip={self.guest.with_prefixlen}", f"dispo.gw={self.gateway}"]
        if self.dns:
            args.append("dispo.dns=" + ",".join(str(d) for d in self.dns))
        args.append(f"dispo.mac={self.mac}")
        return tuple(args)


def resolvers(setting: str, resolv_conf: Path = RESOLV_CONF) -> tuple[ipaddress.IPv4Address, ...]:
    """The guest's resolvers: "auto" = the host's non-loopback IPv4 nameservers, "none", or a list."""
    setting = setting.strip()
    if setting == "none":
        return ()
    if setting == "auto":
        try:
            lines = resolv_conf.read_text().splitlines()
        except OSError:
            return ()
        found: list[ipaddress.IPv4Address] = []
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    addr = ipaddress.ip_address(parts[1])
                except ValueError:
                    continue
                # A loopback resolver (systemd-resolved, dnsmasq on 127.0.0.1) is not reachable from a guest.
                if isinstance(addr, ipaddress.IPv4Address) and not addr.is_loopback and addr not in found:
                    found.append(addr)
        return tuple(found)
    out = []
    for item in setting.split(","):
        try:
            out.append(ipaddress.IPv4Address(item.strip()))
        except ValueError:
            raise ConfigError(f"net.dns: {item.strip()!r} is not an IPv4 address",
                              hint='use "auto", "none" or a comma-separated list such as "1.1.1.1,9.9.9.9"') from None
    return tuple(out)


@dataclass(frozen=True)
class NetworkChecks:
    pool: Pool
    upstream: str
    dns: tuple[ipaddress.IPv4Address, ...]


def check_network_config(net: NetConfig) -> NetworkChecks:
    """Every check attach_network makes before it creates anything (read-only)."""
    pool = Pool.from_config(net)
    dns = resolvers(net.dns)
    host = links.host_view()
    if net.upstream:
        if net.upstream not in host.names:
            raise NetworkError(f"upstream interface {net.upstream!r} does not exist",
                               hint=f"set net.upstream to one of: {', '.join(host.names)} (or leave it empty)")
        upstream = net.upstream
    else:
        if host.default_interface is None:
            raise NetworkError("no default route to find the upstream interface from",
                               hint="add a default route or set net.upstream in the config")
        upstream = host.default_interface
    for ifname, network in host.networks:
        if network.overlaps(pool.network):
            raise ConfigError(f"net.pool {pool.network} overlaps {network} on {ifname}",
                              hint="choose a pool no interface or route of the host uses, e.g. 172.20.0.0/16")
    if not links.ip_forward_enabled():
        raise NetworkError("IPv4 forwarding is off in this network namespace, so guests cannot reach anything",
                           hint="enable it with 'sysctl -w net.ipv4.ip_forward=1' (dispo never changes it)")
    return NetworkChecks(pool, upstream, dns)


def attach_network(session: Transaction, policy: NetworkPolicy | None = None) -> GuestNetwork:
    """Allocate a subnet (lease), create this session's nftables rules and its tap, all journaled before
    creation; everything is undone by the session's journal unwind. Works in the current network namespace."""
    t0 = time.monotonic()
    cfg = session.cfg
    policy = policy or NetworkPolicy()
    checked = check_network_config(cfg.net)
    sid = session.session_id
    journal = session.journal
    state_dir = str(cfg.state_dir)
    netns = links.current_netns()

    name = links.link_name(sid)
    alias = links.alias_for(sid, cfg.state_dir)
    standin = ""
    # One critical section from lease to link: an orphan sweep of this state dir waits for it (and a session
    # waits for a sweep), so a sweep never finds a lease or chains whose link is not there yet.
    with net_lock(cfg.state_dir):
        rules = firewall.SessionRules(sid, ipaddress.IPv4Interface("0.0.0.0/32"), ipaddress.IPv4Address(0),
                                      checked.pool.network, checked.upstream, checked.dns, policy, owner=alias)
        counts = firewall.format_counts(rules.rule_counts())  # the same for any address: only the count matters
        # Everything this section makes is journaled in one write before any of it exists (each undo is
        # idempotent and does nothing for an object that was never made).
        planned: list[tuple[str, dict[str, str]]] = [
            ("net-lease", {"state_dir": state_dir, "session": sid}),
            ("nft-session", {"state_dir": state_dir, "session": sid, "netns": str(netns), "rules": counts})]
        if cfg.net.link is NetLink.VETH_STANDIN:
            standin = links.standin_netns_name(sid)
            planned.append(("net-standin-netns", {"name": standin}))
        planned.append(("net-link", {"name": name, "netns": str(netns)}))
        journal.record_all(planned)

        lease = allocate(cfg.state_dir, checked.pool, sid, netns)
        gateway = ipaddress.IPv4Interface(f"{lease.gateway}/{lease.subnet.prefixlen}")
        mac = mac_for(lease.guest.ip)
        rules = dataclasses.replace(rules, guest=lease.guest, gateway=lease.gateway)
        firewall.install(cfg.state_dir, rules)

        if standin:
            links.create_netns(standin, alias)
            links.create_standin(name, gateway, alias, guest_ns=standin, guest=lease.guest, mac=mac)
        else:
            links.create_tap(name, gateway, alias)

    gn = GuestNetwork(sid, name, mac, lease.guest, lease.gateway, checked.dns, standin)
    log.info("session %s: network %s via %s up in %.3f s", sid, lease.guest, checked.upstream,
             time.monotonic() - t0)
    return gn
