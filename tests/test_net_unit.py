"""Networking pieces that need no namespace: pool arithmetic, leases under concurrency, policy parsing,
the guest's kernel arguments and the rendered nftables rules."""

from __future__ import annotations

import ipaddress
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispo.config import NetConfig
from dispo.errors import ConfigError, InvalidInput, NetworkError
from dispo.net import GuestNetwork, firewall, links, nfnl, resolvers
from dispo.net.firewall import SessionRules, skeleton
from dispo.net.policy import PRIVATE_RANGES, NetworkPolicy
from dispo.net.pool import Pool, allocate, mac_for, net_lock, read_leases, release

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def test_pool_cuts_session_subnets() -> None:
    pool = Pool.from_config(NetConfig(pool="172.20.0.0/16", prefix=30))
    assert pool.capacity == 16384
    first = next(pool.subnets())
    assert first == NET("172.20.0.0/30")


@pytest.mark.parametrize(("pool", "prefix", "words"), [
    ("172.20.0.0/31", 30, "too small"),
    ("172.20.0.0/16", 31, "out of range"),
    ("172.20.0.0/16", 8, "out of range"),
    ("172.20.0.1/16", 30, "not an IPv4 network"),
    ("fd00::/64", 30, "not an IPv4 network"),
    ("banana", 30, "not an IPv4 network"),
])
def test_bad_pool_is_a_config_error(pool: str, prefix: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as e:
        Pool.from_config(NetConfig(pool=pool, prefix=prefix))
    assert "\n" not in e.value.one_line() and "hint:" in e.value.one_line()


def test_mac_is_derived_from_the_guest_address() -> None:
    assert mac_for(IP("172.20.0.6")) == "06:00:ac:14:00:06"
    assert mac_for(IP("10.1.2.255")) == "06:00:0a:01:02:ff"


def test_kernel_args_exact_format() -> None:
    gn = GuestNetwork("0123abcd", "dsp-0123abcd", "06:00:ac:14:00:06", ipaddress.IPv4Interface("172.20.0.6/30"),
                      IP("172.20.0.5"), (IP("1.1.1.1"), IP("9.9.9.9")))
    assert gn.kernel_args() == ("dispo.ip=172.20.0.6/30", "dispo.gw=172.20.0.5", "dispo.dns=1.1.1.1,9.9.9.9",
                                "dispo.mac=06:00:ac:14:00:06")
    no_dns = GuestNetwork("0123abcd", "dsp-0123abcd", "06:00:ac:14:00:06",
                          ipaddress.IPv4Interface("172.20.0.6/30"), IP("172.20.0.5"), ())
    assert no_dns.kernel_args() == ("dispo.ip=172.20.0.6/30", "dispo.gw=172.20.0.5", "dispo.mac=06:00:ac:14:00:06")
    assert len(gn.tap) <= 15


def test_resolvers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 127.0.0.53\nnameserver 192.168.1.1\nnameserver fe80::1\n"
                    "nameserver 1.1.1.1\nnameserver 1.1.1.1\nsearch example\n")
    assert resolvers("auto", conf) == (IP("192.168.1.1"), IP("1.1.1.1"))
    assert resolvers("auto", tmp_path / "missing") == ()
    assert resolvers("none", conf) == ()
    assert resolvers("9.9.9.9, 1.0.0.1", conf) == (IP("9.9.9.9"), IP("1.0.0.1"))
    with pytest.raises(ConfigError, match=r"net\.dns"):
        resolvers("9.9.9.9,example.com", conf)


def test_policy_parsing() -> None:
    p = NetworkPolicy.from_mapping({"internet": False, "allow": ["192.168.1.0/24"], "deny": ["203.0.113.7/32"]})
    assert p == NetworkPolicy(False, (NET("192.168.1.0/24"),), (NET("203.0.113.7/32"),))
    assert NetworkPolicy.from_mapping({}) == NetworkPolicy()


@pytest.mark.parametrize(("data", "words"), [
    ({"allow": ["10.0.0.300/8"]}, "invalid network '10.0.0.300/8'"),
    ({"allow": ["10.0.0.1/8"]}, "host bits set"),
    ({"deny": ["fd00::/8"]}, "IPv6"),
    ({"deny": "10.0.0.0/8"}, "must be a list"),
    ({"allow": [3]}, "is not a network"),
    ({"internet": "yes"}, "true or false"),
    ({"alow": []}, "unknown key"),
])
def test_bad_policy_is_one_line(data: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput, match=words) as e:
        NetworkPolicy.from_mapping(data, where="p.toml")
    assert "\n" not in e.value.one_line()


def test_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('internet = true\ndeny = ["198.51.100.0/24"]\n')
    assert NetworkPolicy.load(f).deny == (NET("198.51.100.0/24"),)
    f.write_text('allow = ["not a cidr"]\n')
    with pytest.raises(InvalidInput, match=str(f)):
        NetworkPolicy.load(f)
    with pytest.raises(InvalidInput, match="does not exist"):
        NetworkPolicy.load(tmp_path / "missing.toml")


def _session_rules(policy: NetworkPolicy, dns: tuple[IP, ...] = (), owner: str = "") -> SessionRules:
    return SessionRules("0123abcd", ipaddress.IPv4Interface("172.20.0.6/30"), IP("172.20.0.5"),
                        NET("172.20.0.0/16"), "up0", dns, policy, owner)


def _rules(policy: NetworkPolicy, dns: tuple[IP, ...] = ()) -> list[str]:
    return _session_rules(policy, dns).render()


def test_rules_default_policy_order() -> None:
    lines = [ln for ln in _rules(NetworkPolicy()) if "s-0123abcd-out" in ln and ln.startswith("add rule")]
    text = "\n".join(lines)
    # Anti-spoofing, then the pool, then private ranges, then the internet, then drop everything else.
    order = ["ip saddr != 172.20.0.6", "ip daddr 172.20.0.0/16", "ip daddr { 0.0.0.0/8", 'oifname "up0" accept']
    positions = [text.index(o) for o in order]
    assert positions == sorted(positions)
    assert lines[-1].endswith("counter drop")
    assert all(str(r) in text for r in PRIVATE_RANGES)


def test_rules_policy_deny_before_allow_before_private() -> None:
    p = NetworkPolicy(internet=False, allow=(NET("10.99.0.0/24"),), deny=(NET("10.99.0.7/32"),))
    text = "\n".join(_rules(p, (IP("192.168.1.1"),)))
    deny = text.index("ip daddr { 10.99.0.7/32 } counter drop")
    dns = text.index("ip daddr { 192.168.1.1 } meta l4proto { tcp, udp } th dport 53 accept")
    allow = text.index("ip daddr { 10.99.0.0/24 } accept")
    private = text.index("ip daddr { 0.0.0.0/8")
    assert deny < dns < allow < private
    assert 'oifname "up0" accept' not in text  # internet = false
    assert 'jump s-0123abcd-out' in text and '"dsp-0123abcd"' in text


def test_rules_check_addresses_before_conntrack() -> None:
    """A guest must not get a forged packet accepted as part of another flow: in every filter chain of the
    session, the IPv4-only and address checks come before any `ct state` rule."""
    lines = _rules(NetworkPolicy(allow=(NET("10.99.0.0/24"),)), (IP("192.168.1.1"),))
    checks = {"out": "ip saddr != 172.20.0.6 counter drop", "to": "ip daddr != 172.20.0.6 counter drop",
              "in": "ip saddr != 172.20.0.6 counter drop"}
    for role, check in checks.items():
        chain = [ln for ln in lines if ln.startswith(f"add rule inet dispo s-0123abcd-{role} ")]
        assert chain[0].endswith("meta nfproto != ipv4 counter drop"), role
        assert chain[1].endswith(check), role
        assert all("ct state" not in ln for ln in chain[:2]), role
        assert any("ct state" in ln for ln in chain[2:]), role
    # And before conntrack itself: the prerouting chain (priority raw) drops what does not route back.
    sk = skeleton()
    assert any("hook prerouting priority raw" in ln for ln in sk)
    assert 'add rule inet dispo prerouting iifname "dsp-*" fib saddr . iif oif missing counter drop' in sk


def test_rules_carry_the_owner_mark_and_count_themselves() -> None:
    owner = links.alias_for("0123abcd", Path("/run/dispo"))
    assert owner == "dispo session 0123abcd state /run/dispo"
    r = _session_rules(NetworkPolicy(), owner=owner)
    lines = r.render()
    for role in ("out", "to", "in", "nat"):
        assert f'add chain inet dispo s-0123abcd-{role} {{ comment "{owner}"; }}' in lines
    elements = [ln for ln in lines if ln.startswith("add element")]
    assert len(elements) == 4 and all(f'"dsp-0123abcd" comment "{owner}" : jump s-0123abcd-' in e for e in elements)
    counts = r.rule_counts()
    assert counts == {role: sum(1 for ln in lines if ln.startswith(f"add rule inet dispo s-0123abcd-{role} "))
                      for role in ("out", "to", "in", "nat")}
    assert firewall.parse_counts(firewall.format_counts(counts)) == counts
    assert firewall.BASE_CHAINS == {"prerouting": ("prerouting", 1), "forward": ("forward", 4),
                                    "input": ("input", 2), "postrouting": ("postrouting", 1)}
    # No mark: plain chains and elements (what the parser must also read).
    plain = _rules(NetworkPolicy())
    assert "add chain inet dispo s-0123abcd-out" in plain and not any("comment" in ln for ln in plain)


def test_owner_tag_is_the_path_or_a_hash() -> None:
    assert links.owner_tag(Path("/run/dispo")) == "/run/dispo"
    for odd in (Path("/tmp/" + "x" * 120), Path('/tmp/a"b'), Path("/tmp/tab\there"), Path("/tmp/ünï")):
        tag = links.owner_tag(odd)
        assert tag.startswith("sha256:") and len(tag) == 23, odd
        assert len(links.alias_for("0123abcd", odd)) <= 128  # nftables' comment limit
    assert links.owner_tag(Path("/tmp/a")) != links.owner_tag(Path("/tmp/b"))


def test_parse_chain_comments_and_table() -> None:
    text = (
        "table ip other {\n\tchain s-99999999-out {\n\t\tcomment \"not ours\"\n\t}\n}\n"
        "table inet dispo {\n\tchain prerouting {\n\t\ttype filter hook prerouting priority raw; "
        "policy accept;\n\t}\n\tchain s-0123abcd-out {\n\t\tcomment \"dispo session 0123abcd state /a\"\n"
        "\t}\n\tchain s-0badf00d-out {\n\t}\n}\n"
    )
    assert firewall.parse_chain_comments(text) == {"s-0123abcd-out": "dispo session 0123abcd state /a"}
    objects: list[dict[str, Any]] = [
        {"map": {"name": "fwd_from", "elem": [
            [{"elem": {"val": "dsp-0123abcd", "comment": "dispo session 0123abcd state /a"}},
             {"jump": {"target": "s-0123abcd-out"}}],
            ["dsp-0badf00d", {"jump": {"target": "s-0badf00d-out"}}]]}},
        {"map": {"name": "fwd_to"}},
        {"chain": {"name": "forward", "hook": "forward"}},
        {"chain": {"name": "s-0123abcd-out"}},
        {"rule": {"chain": "s-0123abcd-out"}}, {"rule": {"chain": "s-0123abcd-out"}},
        {"rule": {"chain": "forward"}},
    ]
    state = firewall.parse_table(objects)
    assert state.elements == {"fwd_from": {"dsp-0123abcd": firewall.Element("s-0123abcd-out",
                                                                            "dispo session 0123abcd state /a"),
                                           "dsp-0badf00d": firewall.Element("s-0badf00d-out", "")},
                              "fwd_to": {}}
    assert state.rules == {"forward": 1, "s-0123abcd-out": 2} and state.hooks == {"forward": "forward"}
    assert state.session_ids() == {"0123abcd", "0badf00d"}
    comments = {"s-0123abcd-out": "dispo session 0123abcd state /a"}
    assert state.marks("0123abcd", comments) == {"dispo session 0123abcd state /a"}
    assert state.marks("0badf00d", comments) == set()


def test_nfnl_decodes_verdict_map_elements() -> None:
    """The netlink reader behind missing_rules: a GETSETELEM answer as the kernel lays it out."""
    def element(ifname: str, code: int, chain: str = "") -> bytes:
        verdict = nfnl.attr(nfnl.NFTA_VERDICT_CODE, code.to_bytes(4, "big", signed=True))
        if chain:
            verdict += nfnl.str_attr(nfnl.NFTA_VERDICT_CHAIN, chain)
        key = nfnl.attr(nfnl.NFTA_DATA_VALUE, ifname.encode().ljust(nfnl.IFNAMSIZ, b"\0"))
        data = nfnl.attr(nfnl.NFTA_DATA_VERDICT | 0x8000, verdict)  # NLA_F_NESTED set, as the kernel does
        return nfnl.attr(nfnl.NFTA_LIST_ELEM, nfnl.attr(nfnl.NFTA_SET_ELEM_KEY, key)
                          + nfnl.attr(nfnl.NFTA_SET_ELEM_DATA, data))
    message = (nfnl.str_attr(nfnl.NFTA_SET_ELEM_LIST_TABLE, "dispo")
               + nfnl.str_attr(nfnl.NFTA_SET_ELEM_LIST_SET, "fwd_from")
               + nfnl.attr(nfnl.NFTA_SET_ELEM_LIST_ELEMENTS, element("dsp-0123abcd", nfnl.NFT_JUMP, "s-0123abcd-out")
                            + element("dsp-0badf00d", 0)))  # NF_DROP
    assert nfnl._elements([message]) == {"dsp-0123abcd": "s-0123abcd-out", "dsp-0badf00d": ""}
    assert list(nfnl.attrs(nfnl.str_attr(3, "abc") + nfnl.attr(4, b"\x01"))) == [(3, b"abc\0"), (4, b"\x01")]


def test_net_lock_is_reentrant_and_excludes_other_threads(tmp_path: Path) -> None:
    acquired = threading.Event()

    def other() -> None:
        with net_lock(tmp_path):
            acquired.set()

    with net_lock(tmp_path):
        with net_lock(tmp_path):  # re-entrant: allocate() inside attach_network's critical section
            allocate(tmp_path, Pool(NET("172.20.0.0/30"), 30), "0123abcd", 1)
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        assert not acquired.is_set()  # another thread waits
    t.join(timeout=10)
    assert acquired.is_set()


def test_table_lock_is_reentrant_and_excludes_other_threads() -> None:
    acquired = threading.Event()

    def other() -> None:
        with firewall.table_lock():
            acquired.set()

    with firewall.table_lock(), firewall.table_lock():
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        assert not acquired.is_set()
    t.join(timeout=10)
    assert acquired.is_set()


def test_skeleton_is_rerunnable() -> None:
    lines = skeleton()
    # Base chains are flushed before their rules are added, so running it twice cannot duplicate rules.
    for chain in ("prerouting", "forward", "input", "postrouting"):
        flush = lines.index(f"flush chain inet dispo {chain}")
        assert all(i > flush for i, ln in enumerate(lines) if ln.startswith(f"add rule inet dispo {chain} "))


def _alloc_worker(args: tuple[str, int]) -> str:
    state_dir, i = args
    lease = allocate(Path(state_dir), Pool(NET("172.20.0.0/24"), 30), f"{i:08x}", 1)
    return str(lease.subnet)


def test_concurrent_allocation_is_unique(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(8) as workers:
        subnets = workers.map(_alloc_worker, [(str(tmp_path), i) for i in range(64)])
    assert len(set(subnets)) == 64  # the /24 holds exactly 64 /30s
    assert len(read_leases(tmp_path)) == 64
    with pytest.raises(NetworkError, match="is full"):
        allocate(tmp_path, Pool(NET("172.20.0.0/24"), 30), "ffffffff", 1)
    release(tmp_path, f"{5:08x}")
    again = allocate(tmp_path, Pool(NET("172.20.0.0/24"), 30), "eeeeeeee", 1)
    assert str(again.subnet) == subnets[5]  # the only free subnet is the one just released
    for i in range(64):
        release(tmp_path, f"{i:08x}")
    release(tmp_path, "eeeeeeee")
    assert read_leases(tmp_path) == []
