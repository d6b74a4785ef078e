"""Isolation that fails closed (issue 11), for real, in network namespaces these tests create:

- an orphan sweep racing a session being created, and two state dirs sharing one `inet dispo` table;
- a guest spoofing another flow's source address (conntrack must not vouch for it);
- the rules of a live session disappearing (`nft flush ruleset`), which `dispo.net.missing_rules` reports.

Code that has to run inside the test's "host" namespace with a pause injected (a sweep paused under its lock, a
session paused between its rules and its link) runs as a small script under nsenter; the pause is a file the
test creates, never a sleep that hopes for the best.
"""

from __future__ import annotations

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
    HOST_LAN,
    HOST_PORT,
    INTERNET,
    INTERNET_PORT,
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
ROLES = ("out", "to", "in", "nat")
UDP_PORT = 9999
CLIENT_PORT = 40000


@pytest.fixture
@tier("root")
def world(tmp_path: Path) -> Iterator[NetWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces: run the suite with sudo")
    with net_world(tmp_path / "net") as w:
        yield w


def wait_for(path: Path, timeout: float, proc: subprocess.Popen[str] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"helper exited {proc.returncode} before {path.name}: {err}")
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def env_for(w: NetWorld, state_dir: Path) -> dict[str, str]:
    return dict(w.env(), DISPO_STATE_DIR=str(state_dir))


def dispo_in(w: NetWorld, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(w.dispo_argv(*args), capture_output=True, text=True, env=env_for(w, state_dir),
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def hold_in(w: NetWorld, state_dir: Path, name: str, *, pause_before_link: Path | None = None) -> Held:
    """`dispo net run` in state_dir holding a session until released (like NetWorld.hold). With
    pause_before_link, the session stops after its lease and rules, before its link, until that file exists
    (it creates `<file>.reached` when it gets there)."""
    envfile, gofile = w.root / f"{name}.env", w.root / f"{name}.go"
    script = f'env | grep ^DISPO_ > "{envfile}.tmp"; mv "{envfile}.tmp" "{envfile}"; ' \
             f'while [ ! -e "{gofile}" ]; do sleep 0.05; done'
    cli = ["net", "run", "--name", name, "--", "sh", "-c", script]
    if pause_before_link is None:
        argv = w.dispo_argv(*cli)
    else:
        argv = ["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-c", PAUSED_SESSION,
                str(pause_before_link), *cli]
    proc = w.spawn(argv, env=env_for(w, state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return Held(name, proc, envfile, gofile)


# `dispo net run` with a pause between the session's rules and its link (the window a sweep must not hit).
PAUSED_SESSION = r'''
import sys, time
from pathlib import Path
from dispo.net import links
gate = Path(sys.argv[1])
real = links.create_standin
def paused(*args, **kwargs):
    Path(f"{gate}.reached").touch()
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(*args, **kwargs)
links.create_standin = paused
from dispo.cli.main import main
sys.exit(main(sys.argv[2:]))
'''

# `dispo gc` (gc.collect) with a pause at the orphan sweep's first look at the leases: before the fix that
# was after it had read the journals, after the fix it is under the pool lock, before the journals are read.
PAUSED_SWEEP = r'''
import json, sys, time
from pathlib import Path
from dispo import config, gc
from dispo.net import pool
gate = Path(sys.argv[1])
real = pool.read_leases
calls = []
def paused(state_dir):
    if not calls:
        calls.append(1)
        Path(f"{gate}.reached").touch()
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(state_dir)
pool.read_leases = paused
report = gc.collect(config.load())
print(json.dumps({"orphans": report.orphans, "failed": [str(e) for e in report.failed]}))
'''


def session_objects(w: NetWorld, state_dir: Path, sid: str) -> dict[str, bool]:
    """Which of a session's network objects exist right now."""
    ruleset = nft_ruleset(w.host)
    leases = state_dir / "net" / "leases"
    lease_owners = {json.loads(p.read_text()).get("session") for p in leases.iterdir()} if leases.is_dir() else set()
    out = {f"chain s-{sid}-{r}": f"chain s-{sid}-{r} {{" in ruleset for r in ROLES}
    out["map elements"] = ruleset.count(f'"dsp-{sid}"') == len(ROLES)
    out["link"] = f"dsp-{sid}" in dispo_links(w.host)
    out["lease"] = sid in lease_owners
    return out


def test_sweep_racing_a_new_session_leaves_it_whole(world: NetWorld) -> None:
    """`dispo gc` paused in the middle of its orphan sweep while a session starts: before the fix the sweep had
    read the journals already and then removed the new session's lease, chains and link as orphans."""
    w = world
    gate = w.root / "sweep.gate"
    sweep = w.spawn(["nsenter", f"--net=/run/netns/{w.host}", sys.executable, "-c", PAUSED_SWEEP, str(gate)],
                    env=w.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(gate.with_name(gate.name + ".reached"), 30, sweep), "the sweep never reached its pause"
    late = w.hold("late")
    # The session may start while the sweep is paused. With the fix the sweep holds the pool lock, so the session
    # waits at its first network step; give it every chance to get through anyway.
    ready_during_sweep = wait_for(late.envfile, 3.0, late.proc)
    gate.touch()
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 0, err
    report = json.loads(out)
    vars_ = late.wait_ready(timeout=30)
    sid = vars_["DISPO_SESSION"]
    assert not [o for o in report["orphans"] if sid in o], report  # nothing of the new session was an "orphan"
    assert session_objects(w, w.state_dir, sid) == dict.fromkeys(session_objects(w, w.state_dir, sid), True)
    assert fetch(late.guest_ns, INET_URL) == PAGE  # and its network works
    assert not ready_during_sweep, "the session's network was set up while the sweep held the lock"
    rc, err = late.release()
    assert rc == 0, err
    assert "dispo" not in nft_ruleset(w.host) and dispo_links(w.host) == set()


def test_two_state_dirs_in_one_netns_keep_their_own_rules(world: NetWorld) -> None:
    """Two dispo installations (state dirs A and B) in one network namespace share the `inet dispo` table.
    B's sweep and B's sessions ending must not touch A's chains, map elements, links or stand-ins, not even for
    an A session caught between its rules and its link (no link yet to say whose the chains are)."""
    w = world
    a_dir, b_dir = w.state_dir, w.root / "state-b"
    a1 = hold_in(w, a_dir, "a1")
    va1 = a1.wait_ready()
    gate = w.root / "a2.gate"
    a2 = hold_in(w, a_dir, "a2", pause_before_link=gate)
    assert wait_for(gate.with_name(gate.name + ".reached"), 30, a2.proc)
    a2_sid = next(p.name for p in (a_dir / "sessions").iterdir() if p.name != va1["DISPO_SESSION"])
    b1, b2 = hold_in(w, b_dir, "b1"), hold_in(w, b_dir, "b2")
    b1.wait_ready()
    b2.wait_ready()
    # b2 dies with its journal: only B's orphan sweep can find its objects.
    os.kill(b2.proc.pid, signal.SIGKILL)
    b2.proc.wait(timeout=10)
    b2.gofile.touch()
    subprocess.run(["rm", "-rf", str(b_dir / "sessions" / b2.sid)], check=True)

    # A dry run names what B's sweep would remove, and removes nothing.
    dry = in_ns(w.host, sys.executable, "-c", "import sys; from pathlib import Path; from dispo.net import orphans; "
                "print('\\n'.join(orphans.sweep(Path(sys.argv[1]), dry_run=True).removed))", str(b_dir)).stdout
    assert f"link dsp-{b2.sid}" in dry and f"nftables chains of session {b2.sid}" in dry, dry
    assert a1.sid not in dry and a2_sid not in dry and b1.sid not in dry, dry
    assert session_objects(w, b_dir, b2.sid) == dict.fromkeys(session_objects(w, b_dir, b2.sid), True)

    gc = dispo_in(w, b_dir, "gc")
    assert gc.returncode == 0, gc.stderr
    assert f"dsp-{b2.sid}" in gc.stdout and f"nftables chains of session {b2.sid}" in gc.stdout, gc.stdout
    assert a1.sid not in gc.stdout and a2_sid not in gc.stdout, gc.stdout
    assert session_objects(w, b_dir, b2.sid) == dict.fromkeys(session_objects(w, b_dir, b2.sid), False)
    assert session_objects(w, a_dir, a1.sid) == dict.fromkeys(session_objects(w, a_dir, a1.sid), True)
    a2_now = session_objects(w, a_dir, a2_sid)
    assert {k: v for k, v in a2_now.items() if k != "link"} == dict.fromkeys(set(a2_now) - {"link"}, True), a2_now
    assert a1.guest_ns in w.standin_netns()

    gate.touch()  # a2 goes on and gets its link
    a2.wait_ready()
    assert b1.release()[0] == 0  # B's last session ends: the table stays, A's rules with it
    for h in (a1, a2):
        assert session_objects(w, a_dir, h.sid) == dict.fromkeys(session_objects(w, a_dir, h.sid), True)
        assert fetch(h.guest_ns, INET_URL) == PAGE
    # A's isolation still holds: a1 cannot reach a host service.
    assert fetch(a1.guest_ns, f"http://{HOST_LAN}:{HOST_PORT}/index.txt", 1.5) is None
    # B's sweep finds nothing more; A's own gc finds nothing either while both are alive.
    again = dispo_in(w, b_dir, "gc")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to clean", again.stdout
    mine = dispo_in(w, a_dir, "gc")
    assert mine.returncode == 0 and mine.stdout.strip() == "nothing to clean", mine.stdout
    for h in (a1, a2):
        assert h.release()[0] == 0
    assert "dispo" not in nft_ruleset(w.host)
    assert dispo_links(w.host) == set()
    assert not ({a1.guest_ns, a2.guest_ns, b1.guest_ns, b2.guest_ns} & w.standin_netns())


UDP_SERVER = r'''
import socket, sys
log = open(sys.argv[2], "a", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[3])))
while True:
    data, addr = s.recvfrom(2048)
    log.write(f"{addr[0]}:{addr[1]} {data.decode(errors='replace')}\n")
    s.sendto(b"ack", addr)
'''

UDP_CLIENT = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(5)
s.sendto(sys.argv[4].encode(), (sys.argv[1], int(sys.argv[2])))
assert s.recvfrom(64)[0] == b"ack"
'''

# A guest writing whole IPv4 packets (what a compromised VM can put on its NIC): UDP with any source address.
RAW_UDP = r'''
import socket, struct, sys
src, sport, dst, dport, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload.encode()  # checksum 0: none (IPv4)
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(ip + udp, (dst, 0))
'''


def _counter(text: str, needle: str) -> int:
    return sum(int(line.split("packets ")[1].split()[0]) for line in text.splitlines()
               if needle in line and "packets " in line)


def test_spoofed_packet_matching_another_flow_is_dropped(world: NetWorld) -> None:
    """Guest A forges guest B's source address and port on a UDP flow B has open to the internet. Conntrack
    matches it to B's flow; before the fix the `established` accept came before the source check, so the
    packet was forwarded (and NATed as B's). Now the source checks come first and a prerouting rule drops
    anything whose source does not route back through the link it came in on, before conntrack sees it.
    The host runs loose reverse-path filtering (rp_filter=2, a common default), so only dispo's rules count."""
    w = world
    for key in ("all", "default"):
        in_ns(w.host, "sysctl", "-q", "-w", f"net.ipv4.conf.{key}.rp_filter=2")
    log = w.root / "udp.log"
    log.touch()
    w.spawn(["nsenter", f"--net=/run/netns/{w.internet}", sys.executable, "-c", UDP_SERVER, INTERNET, str(log),
             str(UDP_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = w.hold("a"), w.hold("b")
    va, vb = a.wait_ready(), b.wait_ready()
    a_ip, b_ip = va["DISPO_GUEST_IP"], vb["DISPO_GUEST_IP"]
    # Every link of a session gets strict reverse-path filtering of its own as well.
    for v in (va, vb):
        assert in_ns(w.host, "sysctl", "-n", f"net.ipv4.conf.{v['DISPO_TAP']}.rp_filter").stdout.strip() == "1"

    # B opens a flow to the internet (the server's reply makes it "established" in conntrack).
    deadline = time.monotonic() + 10
    while in_ns(b.guest_ns, sys.executable, "-c", UDP_CLIENT, INTERNET, str(UDP_PORT), str(CLIENT_PORT),
                "hello-from-b", check=False).returncode != 0:
        assert time.monotonic() < deadline, "control: B's UDP flow to the internet did not work"
        time.sleep(0.2)
    conntrack = in_ns(w.host, "cat", "/proc/net/nf_conntrack", check=False).stdout
    assert not conntrack or f"src={b_ip} dst={INTERNET} sport={CLIENT_PORT}" in conntrack

    # Control: A's own raw packets get through, so a missing spoofed packet below is the firewall's doing.
    in_ns(a.guest_ns, sys.executable, "-c", RAW_UDP, a_ip, "41000", INTERNET, str(UDP_PORT), "genuine-from-a")
    deadline = time.monotonic() + 5
    while "genuine-from-a" not in log.read_text():
        assert time.monotonic() < deadline, f"control: A's genuine raw packet did not arrive: {log.read_text()}"
        time.sleep(0.05)

    # The attack: A sends as B, on B's flow.
    in_ns(a.guest_ns, sys.executable, "-c", RAW_UDP, b_ip, str(CLIENT_PORT), INTERNET, str(UDP_PORT),
          "spoofed-by-a")
    time.sleep(1.0)  # the genuine packet took milliseconds; a spoofed one gets far more time to show up
    received = log.read_text()
    assert "hello-from-b" in received
    assert "spoofed-by-a" not in received, f"A's spoofed packet reached the internet as B's: {received}"
    # Dropped at the door: the prerouting reverse-path rule counted it (3 copies were sent).
    pre = in_ns(w.host, "nft", "list", "chain", "inet", "dispo", "prerouting").stdout
    assert _counter(pre, "fib saddr . iif oif missing") >= 3, pre
    for h in (a, b):
        assert h.release()[0] == 0
    assert "dispo" not in nft_ruleset(w.host)


MISSING = r'''
import json, sys
from pathlib import Path
from dispo.net import leftover_rules, missing_rules
if sys.argv[1] == "leftover":
    print(json.dumps(leftover_rules(sys.argv[2])))
else:
    print(json.dumps(missing_rules(Path(sys.argv[1]), sys.argv[2])))
'''


def missing(w: NetWorld, sid: str) -> list[str]:
    """One call of missing_rules() in the test's host namespace, where the sessions' rules are."""
    found: list[str] = json.loads(in_ns(w.host, sys.executable, "-c", MISSING, str(w.state_dir), sid).stdout)
    return found


def leftover(w: NetWorld, sid: str) -> list[str]:
    found: list[str] = json.loads(in_ns(w.host, sys.executable, "-c", MISSING, "leftover", sid).stdout)
    return found


def test_missing_rules_reports_a_flushed_ruleset(world: NetWorld) -> None:
    """`missing_rules(state_dir, session_id)` says what of a live session's firewall is gone, in one call; the
    supervisor ends the session on a non-empty answer, because without the table the kernel forwards the
    guest's packets unfiltered (shown below)."""
    w = world
    a, b = w.hold("watched"), w.hold("neighbour")
    a.wait_ready()
    b.wait_ready()
    host_url = f"http://{HOST_LAN}:{HOST_PORT}/index.txt"
    assert fetch(a.guest_ns, host_url, 1.5) is None  # filtered
    assert missing(w, a.sid) == [] and missing(w, b.sid) == []
    assert missing(w, "0badf00d")  # a session with no rules is reported, not taken as intact
    assert len(leftover(w, a.sid)) == 8 and leftover(w, "0badf00d") == []  # (the receipt's question)

    # One map element of A goes: A's traffic from its link is no longer sent through A's chain. That much fails
    # closed by itself (the base chain drops what comes from a dsp-* link it has no element for), and is reported.
    in_ns(w.host, "nft", "delete", "element", "inet", "dispo", "fwd_from", f'{{ "dsp-{a.sid}" }}')
    found = missing(w, a.sid)
    assert found and all("fwd_from" in m for m in found), found
    assert missing(w, b.sid) == []
    assert fetch(a.guest_ns, INET_URL, 1.5) is None and fetch(b.guest_ns, INET_URL) == PAGE
    # One of A's chains is emptied.
    in_ns(w.host, "nft", "flush", "chain", "inet", "dispo", f"s-{a.sid}-in")
    assert any(f"s-{a.sid}-in" in m for m in missing(w, a.sid))
    # A base chain loses its dispatch rules: every session is affected.
    in_ns(w.host, "nft", "flush", "chain", "inet", "dispo", "input")
    assert any("input" in m for m in missing(w, b.sid))

    # Someone flushes the whole ruleset (as `systemctl restart nftables` does).
    in_ns(w.host, "nft", "flush", "ruleset")
    for h in (a, b):
        found = missing(w, h.sid)
        assert found and "table inet dispo" in found[0], found
    # This is why the session must end: with no rules the kernel forwards and delivers the guest's packets.
    assert fetch(a.guest_ns, host_url, 5) == "host service\n"
    # The sessions still tear down cleanly without their rules.
    for h in (a, b):
        assert h.release()[0] == 0
    assert "dispo" not in nft_ruleset(w.host) and dispo_links(w.host) == set()
