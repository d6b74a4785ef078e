"""The guest agent's protocol version 2 on both sides, without a guest: the real agent.pl served over a socket
pair (its `run` as this test's user), and the host's `AgentCommand` against a hostile guest side that sends
over-long, binary, slow and out-of-order answers. The real path (QEMU/TCG) is tests/test_run.py."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.errors import AgentError
from dispo.guest import agent
from dispo.runtime.cancel import CancelToken

AGENT_PL = Path(__file__).resolve().parents[1] / "src" / "dispo" / "guest" / "agent.pl"
NEW = agent.NewIdentity(hostname="dispo-abc", mac="02:00:00:00:00:01", address="10.0.0.2/30", gateway="10.0.0.1",
                        dns=("10.0.0.1",), host_key=b"-----BEGIN OPENSSH PRIVATE KEY-----\nQUJD\n"
                                                     b"-----END OPENSSH PRIVATE KEY-----\n",
                        user_key="ssh-ed25519 " + "A" * 68 + " dispo-abc-client\n")


def _handle(*lines: str) -> list[str]:
    """agent.pl's replies to `lines`, from its own handle() (nothing is applied: every line here is refused)."""
    code = f'require "{AGENT_PL}"; while (my $l = <STDIN>) {{ chomp $l; print handle($l), "\\n"; }}'
    out = subprocess.run(["perl", "-e", code], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.splitlines()


def test_the_identity_is_one_request_checked_whole_before_any_of_it_is_applied() -> None:
    good = agent.identity_request(NEW, 1_700_000_000_123_456_789, b"\x01" * 64).split(" ")
    assert good[0] == "identity" and len(good) == 11 and good[6:8] == ["1700000000", "123456789"]

    def bad(i: int, word: str) -> str:
        return " ".join([*good[:i], word, *good[i + 1:]])

    # Each one wrong word: refused, and nothing applied (a test host is not changed: its hostname, its clock).
    lines = [bad(1, "../etc"), bad(2, "02:00:00:00:00:zz"), bad(3, "10.0.0.2/33"), bad(4, "10.0.0.1;reboot"),
             bad(5, "8.8.8.8,"), bad(6, "x"), bad(8, "00"), bad(9, b"ssh-rsa AAAA".hex()),
             bad(10, b"ssh-ed25519 AAAA; rm -rf /".hex()), " ".join(good[:-1]), "identity"]
    replies = _handle(*lines, "hello 1 0123abcd", "hello 2 0123abcd", "entropy 00", "hostname x", "net a b c d")
    assert all(r.startswith("err ") for r in replies[:len(lines)]), replies
    assert replies[len(lines):] == ["err unknown request", "ok dispo-agent 2 0123abcd", "err unknown request",
                                    "err unknown request", "err unknown request"]


class GuestAgent:
    """agent.pl serving one end of a socket pair, as it serves its channel in the guest; its `run` runs
    commands as this test's user with /bin/sh in `home`."""

    def __init__(self, home: Path) -> None:
        self.host, guest = socket.socketpair()
        code = (f'require "{AGENT_PL}"; $main::RUN_USER = ""; open(my $fh, "+<&=", {guest.fileno()}) or die; '
                f'exit(serve($fh) ? 0 : 1);')
        self.proc = subprocess.Popen(["perl", "-e", code], pass_fds=(guest.fileno(),), cwd=home,
                                     stdin=subprocess.DEVNULL)
        guest.close()

    def close(self) -> None:
        self.host.close()
        self.proc.wait(10)


@pytest.fixture
def guest_agent(tmp_path: Path) -> Iterator[GuestAgent]:
    g = GuestAgent(tmp_path)
    try:
        yield g
    finally:
        g.close()


def _run(link: agent.AgentLink, command: str, stdin: bytes | None = None,
         cap: int = 1 << 20) -> tuple[int, bytes, bytes, agent.AgentCommand]:
    got: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def output(name: str, data: bytes) -> None:
        got[name] += data
    fd = None
    if stdin is not None:
        r, w = os.pipe()

        def feed() -> None:
            os.write(w, stdin)
            os.close(w)
        threading.Thread(target=feed, daemon=True).start()
        fd = r
    # The session's watcher: its wait wakes when the run is over (nudged), not at its next poll.
    watcher = CancelToken()
    told: list[str] = []

    def over() -> None:
        told.append("over")
        watcher.nudge()
    cmd = agent.AgentCommand(link, command, output=output, cap=cap, stdin_fd=fd, timeout=10, on_over=over)
    while not watcher.wait(3600):  # a run whose end is never told hangs here until pytest-timeout
        if cmd.poll() is not None:
            break
    rc = cmd.poll()
    assert rc is not None and told == ["over"], told
    if fd is not None:
        os.close(fd)
    return rc, got["stdout"], got["stderr"], cmd


def test_a_command_runs_through_the_agent_with_its_stdio_and_status_as_sh_gives_them(
        guest_agent: GuestAgent) -> None:
    link = agent.AgentLink(guest_agent.host)
    link.hello(10, lambda: True)
    argv = ["sh", "-c", 'printf "%s|" "$@"; echo to-err >&2; tr a-z A-Z; exit 7', "sh", "a b", "c'd", '"$HOME"', ""]
    command = shlex.join(argv)
    rc, out, err, _ = _run(link, command, stdin=b"hello\n" * 20000)
    local = subprocess.run(["sh", "-c", command], input=b"hello\n" * 20000, capture_output=True, check=False)
    assert (rc, out, err) == (local.returncode, local.stdout, local.stderr) == (
        7, b"a b|c'd|\"$HOME\"||" + b"HELLO\n" * 20000, b"to-err\n")
    # The channel is lines again after the run: the next request on the same link is answered.
    with pytest.raises(AgentError, match="bad clock"):
        link.request("clock 1 x")
    # Binary output, no stdin (closed at once), a status from a signal (ssh's 255), a command that is not there.
    rc, out, _, _ = _run(link, "head -c 300000 /dev/urandom | od -An -tx1 | wc -l; cat")
    assert rc == 0 and out.strip() == b"18750"
    assert _run(link, "kill -9 $$")[0] == agent.LOST
    rc, _, err, _ = _run(link, "no-such-command-here")
    assert rc == 127 and b"not found" in err


def test_output_past_the_cap_is_read_and_dropped(guest_agent: GuestAgent) -> None:
    link = agent.AgentLink(guest_agent.host)
    link.hello(10, lambda: True)
    rc, out, err, _ = _run(link, "head -c 5000000 /dev/zero; echo done >&2; exit 3", cap=100_000)
    assert rc == 3 and out == b"\0" * 100_000 and err == b""  # the cap is for both streams together


def test_stopping_a_run_kills_the_command_in_the_guest(guest_agent: GuestAgent, tmp_path: Path) -> None:
    link = agent.AgentLink(guest_agent.host)
    link.hello(10, lambda: True)
    cmd = agent.AgentCommand(link, "echo $$ > pid; exec sleep 600", output=lambda n, d: None, cap=0, timeout=10)
    deadline = time.monotonic() + 20
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = int((tmp_path / "pid").read_text())
    assert cmd.poll() is None
    cmd.stop()  # a "k" frame, then the channel closed
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the command outlived its run"
        time.sleep(0.05)
    assert guest_agent.proc.wait(10) in (0, 1)  # the agent saw the host go away and returned


def test_the_agent_refuses_bad_runs_and_ends_a_run_on_a_frame_it_does_not_know(guest_agent: GuestAgent) -> None:
    host = guest_agent.host
    host.sendall(b"run \nrun 00\nrun zz\nrun " + b"61" * 70000 + b"\n")
    host.settimeout(10)
    buf = b""
    while buf.count(b"\n") < 4:
        buf += host.recv(4096)
    assert [line.startswith(b"err ") for line in buf.split(b"\n")[:4]] == [True] * 4, buf
    host.sendall(b"run " + b"sleep 600".hex().encode() + b"\n")
    assert host.recv(3) == b"ok\n"
    host.sendall(b"q\x00\x00")  # no such frame: the agent kills the command and leaves the channel
    assert guest_agent.proc.wait(10) == 1 or host.recv(1) == b""


# -- a hostile guest side ------------------------------------------------------------------------------
class HostileGuest:
    """The guest's end of a socket pair, answering `run` with what it is told (bytes, slowly if asked)."""

    def __init__(self, answer: bytes, *, byte_by_byte: bool = False, hang_up: bool = False) -> None:
        self.host, self.guest = socket.socketpair()
        self.answer, self.slow, self.hang_up = answer, byte_by_byte, hang_up
        self.got = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.guest:
            self.got = self.guest.recv(65536)
            for i in range(0, len(self.answer), 1 if self.slow else len(self.answer) or 1):
                try:
                    self.guest.sendall(self.answer[i:i + 1] if self.slow else self.answer)
                except OSError:
                    return
                if self.slow:
                    time.sleep(0.002)
            if self.hang_up:
                return
            try:
                while self.guest.recv(65536):
                    pass
            except OSError:
                pass


def frame(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack(">H", len(data)) + data


def _hostile(answer: bytes, **kw: bool) -> tuple[int, bytes, bytes, agent.AgentCommand]:
    """`answer` as the guest's side of a run of `true`."""
    g = HostileGuest(answer, **kw)
    return _run(agent.AgentLink(g.host), "true")


@pytest.mark.parametrize(("answer", "why"), [
    (b"ok\n" + b"o\xff\xff" + b"x" * 70000, "a frame of 65535 bytes"),         # over-long frame
    (b"ok\n" + frame(b"X", b"1"), "unknown type"),                             # a type it may not send
    (b"ok\n" + frame(b"x", b"\x1b[2J"), "exit status that is none"),           # binary where text is due
    (b"ok\n" + frame(b"x", b"256"), "exit status that is none"),
    (b"ok\n" + frame(b"i", b"stdin?"), "unknown type"),                        # the host's frame, from the guest
])
def test_the_host_side_ends_a_run_the_guest_breaks(answer: bytes, why: str) -> None:
    rc, _, _, cmd = _hostile(answer)
    assert rc == agent.LOST and why in cmd.error, cmd.error


def test_a_guest_gone_before_its_status_is_a_lost_run() -> None:
    rc, out, _, cmd = _hostile(b"ok\n" + frame(b"o", b"partial"), hang_up=True)
    assert rc == agent.LOST and out == b"partial" and "closed its channel" in cmd.error


def test_the_host_side_refuses_a_run_reply_that_is_not_ok() -> None:
    for answer, why in ((b"x" * 2000, "over-long"), (b"ok \x1b]0;pwned\x07\n", "not printable"),
                        (b"err no\n", "refused 'run'"), (frame(b"x", b"0"), "did not answer 'run' within 1 s")):
        g = HostileGuest(answer)  # the last: a status without "ok", whose bytes are no line: silence
        with pytest.raises(AgentError, match=why):
            agent.AgentCommand(agent.AgentLink(g.host), "true", output=lambda n, d: None, cap=10, timeout=1)


def test_the_host_side_takes_a_slow_guest_and_frames_after_the_status_are_not_read() -> None:
    # Byte by byte, with control characters in the output (they are data: the CLI escapes them, not this).
    answer = b"ok\n" + frame(b"o", b"out\x1b[2J") + frame(b"e", b"err") + frame(b"x", b"3") + frame(b"o", b"late")
    rc, out, err, cmd = _hostile(answer, byte_by_byte=True)
    assert (rc, out, err, cmd.error) == (3, b"out\x1b[2J", b"err", "")
    # A status before any output; output after the status never reaches the session.
    rc, out, _, _ = _hostile(b"ok\n" + frame(b"x", b"0") + frame(b"o", b"after"))
    assert (rc, out) == (0, b"")


def test_hello_tells_an_older_agent_from_a_silent_one() -> None:
    with pytest.raises(AgentError, match="protocol 2"):
        agent.AgentLink(HostileGuest(b"err unknown request\n").host).hello(5, lambda: True)
    assert agent.AgentLink(HostileGuest(b"err unknown request\n").host).hello(5, lambda: True, too_old_ok=True) is False
    with pytest.raises(AgentError, match="did not answer"):
        agent.AgentLink(HostileGuest(b"").host).hello(1, lambda: True)


# -- the runtime's path: ready by the agent, the command through it ---------------------------------------
def test_a_session_is_ready_by_its_agent_and_its_command_runs_through_it(tmp_path: Path) -> None:
    """The runtime with fake machinery whose guest's agent is the real agent.pl (on a socket pair): an image
    dispo built is found ready by the agent's answer, and the command runs through it, not as a host process
    (the fake guest's SSH stand-in, FakeChannel, would run it as one: the journal shows none)."""
    import dataclasses
    import json

    from dispo.runtime import EventKind, Runtime, build
    from dispo.web.viewers import StandaloneViewers
    from tests import fakes
    from tests.fakeworld import leftovers
    from tests.test_runtime import Recorder

    cfg = fakes.config(tmp_path)
    meta_path = cfg.images_dir / "minimal" / "image.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "provenance": "built"}))  # as `dispo image build` leaves it
    home = tmp_path / "agent-home"
    home.mkdir()
    agents: list[GuestAgent] = []

    def agent_link(vmm: object, timeout: float, alive: object) -> agent.AgentLink:
        g = GuestAgent(home)
        agents.append(g)
        link = agent.AgentLink(g.host)
        link.hello(timeout, lambda: True)
        return link

    machinery = dataclasses.replace(fakes.machinery(), agent_link=agent_link)
    viewers = StandaloneViewers()
    rt = Runtime(cfg, machinery=machinery, viewers=viewers)
    before = leftovers(cfg)
    spawned: list[str] = []
    try:
        rec = Recorder()
        live = rt.start(build(cfg, command=["sh", "-c", 'echo "out $1"; echo err >&2; exit 7', "sh", "a b"]),
                        sink=rec)
        journal = cfg.state_dir / "sessions" / live.id / "state.json"  # every host process, while it runs
        while not live.wait(0.02):
            with contextlib.suppress(OSError):
                spawned += [w for w in ("command-ssh", "app-ssh") if w in journal.read_text()]
        assert live.exit_status == 7 and live.error is None, live.status()
        assert rec.output("stdout") == b"out a b\n" and rec.output("stderr") == b"err\n"
        assert spawned == [] and len(agents) == 1
        assert rec.kinds(EventKind.READY)[0].fields["by"] == "agent"
        assert leftovers(cfg) == before
    finally:
        assert rt.shutdown("test over", timeout=30) == []
        viewers.close()
        for g in agents:
            g.close()


def test_a_guest_that_dies_as_its_command_starts_is_said_to_have_stopped(tmp_path: Path) -> None:
    """The VMM is killed while the `run` request is out (its channel closes unanswered): the session ends saying
    the guest stopped, with the VMM's status, as when it dies while the command runs; nothing is left."""
    import dataclasses
    import json
    from typing import Any

    from dispo.runtime import Runtime, build
    from dispo.web.viewers import StandaloneViewers
    from tests import fakes
    from tests.fakeworld import leftovers

    cfg = fakes.config(tmp_path)
    meta_path = cfg.images_dir / "minimal" / "image.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "provenance": "built"}))
    guests: list[HostileGuest] = []

    def agent_link(vmm: Any, timeout: float, alive: object) -> agent.AgentLink:
        g = HostileGuest(b"", hang_up=True)  # reads the run line, then the channel is gone: so is the VMM
        guests.append(g)
        link = agent.AgentLink(g.host)
        real = link.request

        def request(line: str, timeout: float = 30.0) -> str:
            if line.startswith("run "):
                vmm.kill()
            return real(line, timeout)
        link.request = request  # type: ignore[method-assign]
        return link

    rt = Runtime(cfg, machinery=dataclasses.replace(fakes.machinery(), agent_link=agent_link),
                 viewers=StandaloneViewers())
    before = leftovers(cfg)
    try:
        live = rt.start(build(cfg, command=["true"]))
        assert live.wait(60)
        assert live.error is not None and "the guest stopped while the command ran" in live.error.message, live.error
        assert "exit status -9" in live.error.message and len(guests) == 1
        assert leftovers(cfg) == before
    finally:
        assert rt.shutdown("test over", timeout=30) == []


def test_a_nudge_wakes_a_wait_once_and_leaves_the_token_unset() -> None:
    t = CancelToken()
    t.nudge()  # before the wait: not lost
    assert t.wait(3600) is False and not t.is_set()
    threading.Timer(0.05, t.nudge).start()
    assert t.wait(3600) is False  # woken by the nudge, from another thread
    t.set("asked")
    assert t.wait(0) is True and t.reason == "asked"


# -- the network, applied over rtnetlink (as root, in a namespace of the test's own) ----------------------
@pytest.mark.root
def test_the_agent_readdresses_the_interface_over_netlink_as_ip_would(tmp_path: Path) -> None:
    """A clone's interface carries the template's addresses, route and learnt neighbours; the agent's net_apply
    (what `identity` does, less resolv.conf) leaves only the new ones, the MAC changed with the link up."""
    ns = f"dispo-t-agentnl-{os.getpid()}"

    def sh(*a: str) -> str:
        return subprocess.run(["ip", "-n", ns, *a], check=True, capture_output=True, text=True, timeout=30).stdout
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        sh("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        for dev in ("peer0", "eth0"):
            sh("link", "set", dev, "up")
        for addr in ("10.9.0.2/30", "10.9.0.3/30"):
            sh("addr", "add", addr, "dev", "eth0")
        sh("route", "add", "default", "via", "10.9.0.1")
        sh("neigh", "add", "10.9.0.1", "lladdr", "02:00:00:00:00:01", "nud", "stale", "dev", "eth0")
        code = (f'require "{AGENT_PL}"; open(my $f, "<", "/sys/class/net/eth0/ifindex") or die; my $i = <$f>; '
                f'chomp $i; socket(my $s, 16, 3, 0) or die; '
                f'print "[", net_apply($s, $i, pack("H*", "0a1b2c3d4e5f"), "172.16.5.6", 24, "172.16.5.1"), "]";')
        out = subprocess.run(["ip", "netns", "exec", ns, "perl", "-e", code], check=True, capture_output=True,
                             text=True, timeout=30).stdout
        assert out == "[]"
        assert sh("-4", "-o", "addr", "show", "dev", "eth0").split()[3:4] == ["172.16.5.6/24"]
        assert len(sh("-4", "-o", "addr", "show", "dev", "eth0").splitlines()) == 1
        link = sh("-o", "link", "show", "dev", "eth0")
        assert "link/ether 0a:1b:2c:3d:4e:5f" in link and ",UP" in link
        assert sh("route", "show", "default").split() == ["default", "via", "172.16.5.1", "dev", "eth0"]
        assert "10.9.0.1" not in sh("neigh", "show", "dev", "eth0")
        # A second time on the new state (a bad address word is refused before: do_identity), the same result.
        out = subprocess.run(["ip", "netns", "exec", ns, "perl", "-e", code], check=True, capture_output=True,
                             text=True, timeout=30).stdout
        assert out == "[]" and sh("route", "show", "default").split()[2] == "172.16.5.1"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
