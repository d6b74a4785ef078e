"""Session networks for real, in namespaces these tests create: NAT, isolation, policy, teardown, bad input,
crash recovery and 50 concurrent sessions. dispo runs inside the test's "host" netns (nsenter)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import (
    DISPO,
    HOST_LAN,
    HOST_PORT,
    HOST_UP,
    INTERNET,
    INTERNET_OTHER,
    INTERNET_PORT,
    INTERNET_PRIVATE,
    PAGE,
    Held,
    NetWorld,
    dispo_links,
    fetch,
    in_ns,
    net_world,
    nft_ruleset,
)
from tests.tiers import tier

pytestmark = pytest.mark.root

INET_URL = f"http://{INTERNET}:{INTERNET_PORT}/index.txt"
GUEST_PORT = 8082


@pytest.fixture
@tier("root")
def world(tmp_path: Path) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces: run the suite with sudo")
    with net_world(tmp_path / "net") as w:
        yield w


def leases(w: NetWorld) -> set[str]:
    d = w.state_dir / "net" / "leases"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def journals(w: NetWorld) -> set[str]:
    d = w.state_dir / "sessions"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def session_chains(w: NetWorld) -> set[str]:
    return {line.split()[1] for line in nft_ruleset(w.host).splitlines() if line.strip().startswith("chain s-")}


def assert_nothing_left(w: NetWorld, standins: set[str]) -> None:
    assert "dispo" not in nft_ruleset(w.host)
    assert dispo_links(w.host) == set()
    assert not (standins & w.standin_netns())
    assert leases(w) == set()
    assert journals(w) == set()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dispo: error: ") and "(hint: " in lines[0], lines[0]
    return lines[0]


def serve_in_guest(w: NetWorld, h: Held) -> None:
    d = w.root / f"www-{h.name}"
    d.mkdir()
    (d / "index.txt").write_text(f"guest {h.name}\n")
    w.spawn(["nsenter", f"--net=/run/netns/{h.guest_ns}", sys.executable, "-m", "http.server", "-b", "0.0.0.0",  # noqa: S104 - inside a test netns
             str(GUEST_PORT), "-d", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while fetch(h.guest_ns, f"http://127.0.0.1:{GUEST_PORT}/index.txt", 1) is None:
        assert time.monotonic() < deadline, "guest HTTP server did not start"
        time.sleep(0.05)


def test_two_sessions_nat_isolation_and_teardown(world: NetWorld) -> None:
    w = world
    a, b = w.hold("a"), w.hold("b")
    va, vb = a.wait_ready(), b.wait_ready()
    assert va["DISPO_GUEST_CIDR"] != vb["DISPO_GUEST_CIDR"]
    assert dispo_links(w.host) == {va["DISPO_TAP"], vb["DISPO_TAP"]}
    # The stand-in guest NIC carries exactly what the kernel arguments say.
    kargs = dict(arg.split("=", 1) for arg in va["DISPO_KERNEL_ARGS"].split())
    eth0 = in_ns(a.guest_ns, "ip", "-j", "addr", "show", "eth0").stdout
    info = json.loads(eth0)[0]
    assert info["address"] == kargs["dispo.mac"]
    assert f"{info['addr_info'][0]['local']}/{info['addr_info'][0]['prefixlen']}" == kargs["dispo.ip"]

    # Through the NAT to the internet: both succeed, and the server sees the host's upstream address.
    assert fetch(a.guest_ns, INET_URL) == PAGE
    assert fetch(b.guest_ns, INET_URL) == PAGE
    log = (w.root / "http-inet.log").read_text()
    assert f"{HOST_UP} - -" in log and "172.20." not in log

    serve_in_guest(w, a)
    serve_in_guest(w, b)
    targets = {
        "other session's guest": f"http://{vb['DISPO_GUEST_IP']}:{GUEST_PORT}/index.txt",
        "other session's gateway": f"http://{vb['DISPO_GATEWAY']}:{HOST_PORT}/index.txt",
        "own gateway's services": f"http://{va['DISPO_GATEWAY']}:{HOST_PORT}/index.txt",
        "host address on another interface": f"http://{HOST_LAN}:{HOST_PORT}/index.txt",
        "host upstream address": f"http://{HOST_UP}:{HOST_PORT}/index.txt",
        "private address in the internet netns": f"http://{INTERNET_PRIVATE}:{INTERNET_PORT}/index.txt",
    }
    # Control: every target is up and reachable from the host netns itself, so a failure below is dispo's doing.
    for name, url in targets.items():
        assert fetch(w.host, url) is not None, f"control failed: {name} not reachable from the host netns"
    failed = [name for name, url in targets.items() if fetch(a.guest_ns, url, 1.5) is None]
    assert failed == list(targets)
    # And the other way: B cannot reach A either (whose server the host itself reaches).
    a_url = f"http://{va['DISPO_GUEST_IP']}:{GUEST_PORT}/index.txt"
    assert fetch(w.host, a_url) == "guest a\n"
    assert fetch(b.guest_ns, a_url, 1.5) is None
    # The drops were counted by A's rules (not just failed somewhere else).
    drops = in_ns(w.host, "nft", "list", "chain", "inet", "dispo", f"s-{a.sid}-out").stdout
    drops += in_ns(w.host, "nft", "list", "chain", "inet", "dispo", f"s-{a.sid}-in").stdout
    assert sum(int(x.split("packets ")[1].split()[0]) for x in drops.splitlines() if "packets " in x) >= 6

    chains_before = session_chains(w)
    assert {f"s-{a.sid}-{r}" for r in ("out", "to", "in", "nat")} <= chains_before
    rc, err = a.release()
    assert rc == 0, err
    # A is gone entirely; B is untouched and still works.
    assert dispo_links(w.host) == {vb["DISPO_TAP"]}
    assert session_chains(w) == {c for c in chains_before if f"-{a.sid}-" not in c}
    assert a.guest_ns not in w.standin_netns()
    b_net = ipaddress.IPv4Interface(vb["DISPO_GUEST_CIDR"]).network
    assert leases(w) == {f"{b_net.network_address}-{b_net.prefixlen}"}
    assert fetch(b.guest_ns, INET_URL) == PAGE
    rc, err = b.release()
    assert rc == 0, err
    assert_nothing_left(w, {a.guest_ns, b.guest_ns})


def test_policy_allow_and_deny(world: NetWorld) -> None:
    w = world
    lan = w.root / "lan.toml"
    lan.write_text(f'allow = ["10.99.0.0/24"]\ndeny = ["{INTERNET}/32"]\n')
    only = w.root / "only.toml"
    only.write_text(f'internet = false\nallow = ["{INTERNET}/32"]\n')
    p, q = w.hold("p", "--policy", lan), w.hold("q", "--policy", only)
    p.wait_ready()
    q.wait_ready()
    private_url = f"http://{INTERNET_PRIVATE}:{INTERNET_PORT}/index.txt"
    other_url = f"http://{INTERNET_OTHER}:{INTERNET_PORT}/index.txt"
    assert fetch(w.host, other_url) == PAGE  # control
    results = {
        ("p", "allowed private range"): fetch(p.guest_ns, private_url, 5.0) == PAGE,
        ("p", "denied internet address"): fetch(p.guest_ns, INET_URL, 1.5) is None,
        ("p", "other internet address"): fetch(p.guest_ns, other_url, 5.0) == PAGE,
        ("q", "allow-listed address"): fetch(q.guest_ns, INET_URL, 5.0) == PAGE,
        ("q", "not allow-listed internet"): fetch(q.guest_ns, other_url, 1.5) is None,
        ("q", "private range"): fetch(q.guest_ns, private_url, 1.5) is None,
    }
    assert [k for k, ok in results.items() if not ok] == []
    for h in (p, q):
        assert h.release()[0] == 0
    assert_nothing_left(w, {p.guest_ns, q.guest_ns})


# A reader on the real tap, doing what a VMM does: open it by name (IFF_TAP | IFF_NO_PI), then speak
# Ethernet as the guest: ARP for the gateway, ping the gateway (allowed), ping a host address on another
# interface (refused by the firewall: no answer), ARP for the host's other addresses (the host's uplink and
# LAN addresses: no answer, so the guest learns only its gateway).
TAP_READER = r'''
import fcntl, os, select, socket, struct, sys, json
name, mac, ip, gw, lan, up, out = sys.argv[1:8]
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))
gmac = bytes.fromhex(mac.replace(":", ""))
gip, gwip, lanip = (socket.inet_aton(x) for x in (ip, gw, lan))
def frames(timeout):
    end = __import__("time").monotonic() + timeout
    while (left := end - __import__("time").monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            yield os.read(fd, 2048)
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return (~s) & 0xFFFF
def arp_for(target, tries):
    arp = b"\xff" * 6 + gmac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + gmac + gip + b"\0" * 6 + target
    for attempt in range(tries):  # a guest retries ARP too: the first frame may race the link coming up
        os.write(fd, arp)
        for f in frames(0.5):
            if f[12:14] == b"\x08\x06" and struct.unpack("!H", f[20:22])[0] == 2 and f[28:32] == target:
                return f[22:28]
    return None
gwmac = arp_for(gwip, 6)
res = {"arp": gwmac is not None}
if gwmac:  # the link is up and answering: now ask for the host's other addresses
    res["arp_host_lan"] = arp_for(lanip, 2) is not None
    res["arp_host_up"] = arp_for(socket.inet_aton(up), 2) is not None
def ping(dst, ident):
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"dispo"
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0, gip, dst)
    iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
    for attempt in range(3):
        os.write(fd, gwmac + gmac + b"\x08\x00" + iph + icmp)
        for f in frames(1):
            if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0 and struct.unpack("!H", f[38:40])[0] == ident:
                return True
    return False
if gwmac:
    res["ping_gateway"] = ping(gwip, 0x1111)
    res["ping_host_lan"] = ping(lanip, 0x2222)
open(out, "w").write(json.dumps(res))
'''


def test_real_tap_is_created_journaled_usable_and_removed(world: NetWorld) -> None:
    w = world
    w.write_config(link="tap", dns="192.0.2.53")
    script = w.root / "tap_reader.py"
    script.write_text(TAP_READER)
    out, snap, link_json = w.root / "tap.json", w.root / "state.json", w.root / "link.json"
    cmd = (f'cp "{w.state_dir}/sessions/$DISPO_SESSION/state.json" "{snap}"; '
           f'ip -j -d addr show dev "$DISPO_TAP" > "{link_json}"; '
           f'{sys.executable} "{script}" "$DISPO_TAP" "$DISPO_MAC" "$DISPO_GUEST_IP" "$DISPO_GATEWAY" '
           f'{HOST_LAN} {HOST_UP} "{out}"; echo "$DISPO_KERNEL_ARGS"')
    proc = w.dispo("net", "run", "--", "sh", "-c", cmd)
    assert proc.returncode == 0, proc.stderr
    # Journal: every object recorded (they were recorded before creation: see the order).
    kinds = [r["kind"] for r in json.loads(snap.read_text())["resources"]]
    assert kinds == ["net-lease", "nft-session", "net-link"]
    link = json.loads(link_json.read_text())[0]
    sid = json.loads(snap.read_text())["id"]
    assert link["ifname"] == f"dsp-{sid}" and len(link["ifname"]) <= 15
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == "tap"
    assert link["linkinfo"]["info_data"]["pi"] is False and link["linkinfo"]["info_data"]["multi_queue"] is False
    assert link["linkinfo"]["info_data"]["user"] == "root"
    assert f"dispo session {sid}" in link["ifalias"]
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == ["172.20.0.1"]
    assert not [a for a in link["addr_info"] if a["family"] == "inet6"]  # IPv6 is off on the tap
    assert json.loads(out.read_text()) == {"arp": True, "arp_host_lan": False, "arp_host_up": False,
                                               "ping_gateway": True, "ping_host_lan": False}
    assert proc.stdout.split() == ["dispo.ip=172.20.0.2/30", "dispo.gw=172.20.0.1", "dispo.dns=192.0.2.53",
                                   "dispo.mac=06:00:ac:14:00:02"]
    assert_nothing_left(w, set())


def test_bad_input_is_one_line_and_creates_nothing(world: NetWorld) -> None:
    w = world
    bad_policy = w.root / "bad.toml"
    bad_policy.write_text('allow = ["10.0.0.300/8"]\n')
    cases: list[tuple[dict[str, str | int], tuple[str, ...], str]] = [
        ({"pool": "172.20.0.0/31"}, (), "too small"),
        ({"pool": "172.20.0.0/16", "prefix": 20}, (), "net.prefix = 20 is not allowed"),
        ({"pool": "203.0.113.0/25"}, (), "overlaps 203.0.113.0/24 on up0"),
        ({"pool": "198.51.0.0/16"}, (), "overlaps 198.51.100.0/24 on lan0"),
        ({"upstream": "nope0"}, (), "upstream interface 'nope0' does not exist"),
        ({"dns": "1.1.1.1,dns.example"}, (), "net.dns"),
        ({}, ("--policy", str(bad_policy)), "invalid network '10.0.0.300/8'"),
        ({}, ("--policy", str(w.root / "missing.toml")), "does not exist"),
    ]
    for net, extra, words in cases:
        w.write_config(**{"link": "veth-standin", "dns": "none", **net})
        line = one_line_error(w.dispo("net", "run", *extra, "--", "true"))
        assert words in line, (net, line)
        assert_nothing_left(w, set())
    w.write_config(link="veth-standin", dns="none")
    in_ns(w.host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    try:
        line = one_line_error(w.dispo("net", "run", "--", "true"))
        assert "forwarding is off" in line and "net.ipv4.ip_forward=1" in line
        assert_nothing_left(w, set())
    finally:
        in_ns(w.host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")


def _kill_holder(h: Held) -> None:
    os.kill(h.proc.pid, signal.SIGKILL)  # nsenter execs dispo: this pid is dispo itself
    h.proc.wait(timeout=10)
    h.gofile.touch()  # lets the orphaned `sh` child end


def test_crash_then_gc_and_orphan_sweep(world: NetWorld) -> None:
    w = world
    h, o = w.hold("crash"), w.hold("orphan")
    h.wait_ready()
    o.wait_ready()
    _kill_holder(h)
    _kill_holder(o)
    assert dispo_links(w.host) == {f"dsp-{h.sid}", f"dsp-{o.sid}"}
    # The journal of `o` is lost as well: only the orphan sweep can find its objects.
    subprocess.run(["rm", "-rf", str(w.state_dir / "sessions" / o.sid)], check=True)
    ls = w.dispo("net", "ls")
    assert ls.returncode == 0, ls.stderr
    rows = {line.split()[5]: line.split()[6] for line in ls.stdout.splitlines()[1:]}
    assert rows == {h.sid: "dead", o.sid: "orphan"}

    gc = w.dispo("gc")  # unwinds the dead session's journal, then sweeps what no journal knows
    assert gc.returncode == 0, gc.stderr
    assert f"reclaimed session {h.sid}" in gc.stdout
    assert f"removed orphan link dsp-{o.sid}" in gc.stdout
    assert f"nftables chains of session {o.sid}" in gc.stdout
    assert_nothing_left(w, {h.guest_ns, o.guest_ns})
    again = w.dispo("net", "gc")
    assert again.stdout.strip() == "nothing to clean"


def test_fifty_concurrent_sessions(world: NetWorld) -> None:
    w = world
    w.write_config(link="tap", dns="none")  # real taps: the VM-facing kind
    n = 50
    held = [w.hold(f"c{i}") for i in range(n)]
    subnets = [h.wait_ready(timeout=180)["DISPO_GUEST_CIDR"] for h in held]
    assert len(set(subnets)) == n, "duplicate subnet"
    assert len({h.vars["DISPO_MAC"] for h in held}) == n
    assert len(dispo_links(w.host)) == n
    assert len(session_chains(w)) == 4 * n
    assert len(leases(w)) == n
    ls = w.dispo("net", "ls")
    assert len(ls.stdout.splitlines()) == n + 1 and ls.stdout.count(" live ") == n
    for h in held:
        h.gofile.touch()
    for h in held:
        _, err = h.proc.communicate(timeout=180)
        assert h.proc.returncode == 0, err
    assert_nothing_left(w, set())


def test_gc_from_another_netns_refuses_and_keeps_the_journal(world: NetWorld) -> None:
    w = world
    w.write_config(link="tap", dns="none")  # (removing a stand-in netns would take its veth along)
    h = w.hold("elsewhere")
    h.wait_ready()
    _kill_holder(h)
    other = f"{w.host}-other"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        env = w.env()
        wrong = subprocess.run(["nsenter", f"--net=/run/netns/{other}", *DISPO, "gc"], env=env,
                               capture_output=True, text=True, timeout=60, check=False)
        assert wrong.returncode == 1
        assert "network namespace" in wrong.stderr and "nsenter" in wrong.stderr
        assert h.sid in journals(w)  # kept for a gc in the right place
        assert dispo_links(w.host) == {f"dsp-{h.sid}"}  # and nothing was removed by mistake
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False)
    right = w.dispo("gc")
    assert right.returncode == 0, right.stderr
    assert_nothing_left(w, set())


def test_sigterm_unwinds_and_stray_dispo_links_fail_closed(world: NetWorld) -> None:
    w = world
    h = w.hold("term")
    h.wait_ready()
    # A "dsp-" link dispo has no rules for (e.g. made by hand) is dropped by the base chains, not forwarded.
    stray_ns = f"{w.host}-stray"
    subprocess.run(["ip", "netns", "add", stray_ns], check=True)
    try:
        for argv in (["ip", "-n", w.host, "link", "add", "dsp-0badf00d", "type", "veth", "peer", "name", "eth0",
                      "netns", stray_ns],
                     ["ip", "-n", w.host, "addr", "add", "10.123.0.1/30", "dev", "dsp-0badf00d"],
                     ["ip", "-n", w.host, "link", "set", "dsp-0badf00d", "up"],
                     ["ip", "-n", stray_ns, "addr", "add", "10.123.0.2/30", "dev", "eth0"],
                     ["ip", "-n", stray_ns, "link", "set", "eth0", "up"],
                     ["ip", "-n", stray_ns, "route", "add", "default", "via", "10.123.0.1"]):
            subprocess.run(argv, check=True)
        assert fetch(stray_ns, INET_URL, 1.5) is None
        assert fetch(stray_ns, f"http://10.123.0.1:{HOST_PORT}/index.txt", 1.5) is None
        base = in_ns(w.host, "nft", "list", "chain", "inet", "dispo", "forward").stdout
        base += in_ns(w.host, "nft", "list", "chain", "inet", "dispo", "input").stdout
        assert sum(int(x.split("packets ")[1].split()[0]) for x in base.splitlines() if "packets " in x) >= 2
    finally:
        subprocess.run(["ip", "-n", w.host, "link", "del", "dsp-0badf00d"], check=False)
        subprocess.run(["ip", "netns", "del", stray_ns], check=False)
    os.kill(h.proc.pid, signal.SIGTERM)
    _, err = h.proc.communicate(timeout=30)
    assert h.proc.returncode == 128 + signal.SIGTERM, err
    h.gofile.touch()
    assert "stopped by SIGTERM" in err
    assert_nothing_left(w, {h.guest_ns})
