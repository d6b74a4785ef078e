"""Fakes for the runtime's machinery, named as such: a VMM that is a sleeping process, a network that
creates nothing, and a guest channel that runs the "guest" command on the host.

They stand in for what makes real sessions slow or root-only (a tap, nftables, a booting kernel, SSH), so
the runtime, the service, timeouts, cancellation and reclaim are tested in seconds without root. Everything
else is real: the journal and its lock, the session disk (a copy of a real ext4 image), the journaled and
gated processes, the viewer. The real machinery is tested end to end in test_run.py, test_browser.py and
test_service_e2e.py.

    cfg = fakes.config(tmp_path)                      # workspace + state dir + image "minimal" + profile "chromium"
    rt = Runtime(cfg, machinery=fakes.machinery())
    dispod --machinery tests.fakes:machinery          # the same for the service (DISPO_CONFIG=fakes.config_file)
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dispo import config as config_mod
from dispo import guest
from dispo.config import Config
from dispo.errors import GuestFailure, VmmError
from dispo.infra import processes
from dispo.infra.txn import Transaction
from dispo.net import GuestNetwork, NetworkPolicy
from dispo.runtime.machinery import GuestChannel, Identity, Machinery
from dispo.storage.images import ImageStore
from dispo.vmm.accel import Accel
from dispo.vmm.base import Capability, MachineSpec, Vmm, VmmKind, tail
from tests.fakecdp import FAKE_CDP
from tests.worlds import make_ext4

REPO = Path(__file__).resolve().parent.parent
MARKER = "dispo-fakevm-"  # in the fake VMM's argv: `pgrep -f dispo-fakevm-<id>` finds it
READY_LINE = "fake guest: ready"

# The fake VMM: prints to its "serial console" (stdout), then sleeps until SIGTERM; power-off is SIGTERM.
_FAKE_VM = f"""
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
delay = float(sys.argv[2])
print("fake guest: booting", sys.argv[1], flush=True)
time.sleep(delay)
print({READY_LINE!r}, flush=True)
while True:
    time.sleep(3600)
"""

# The fake web display, on the socket the real channel would forward to: a VNC server that does RFB 3.8's
# handshake (no security, a SCREEN_SIZE screen) and draws SCREEN_RGB under a BAR_RGB bar (a "browser" with its
# toolbar) whenever a whole frame is asked for, in the pixel format the client set (32 bpp); it answers no
# incremental request (nothing changes), so a viewer connects and a thumbnail shows the known colour.
SCREEN_SIZE = (320, 240)
SCREEN_RGB = (0x2E, 0x8B, 0x57)  # "sea green": what a thumbnail of a fake session shows below its bar
BAR_RGB = (0xDD, 0xDD, 0xDD)
BAR_ROWS = 24
_FAKE_VNC = f"""
import os, signal, socket, struct, sys, threading
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
path = sys.argv[1]
W, H, SCREEN, BAR, BAR_ROWS = {SCREEN_SIZE[0]}, {SCREEN_SIZE[1]}, {SCREEN_RGB!r}, {BAR_RGB!r}, {BAR_ROWS}
COLOUR = globals().get("COLOUR")  # set by a line before this text (FakeChannel.display), else None
if COLOUR:  # VNC_COLOUR: a 64x48 screen of that one colour, drawn at every update request (a recorder's)
    W, H, BAR_ROWS = 64, 48, 0
    SCREEN = tuple(int(COLOUR[i * 2:i * 2 + 2], 16) for i in range(3))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); s.listen(8)
def read(c, n):
    data = b""
    while len(data) < n:
        chunk = c.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data
def pixel(fmt, rgb):
    bpp, big, rs, gs, bs = fmt[0], fmt[2], fmt[10], fmt[11], fmt[12]
    value = (rgb[0] << rs) | (rgb[1] << gs) | (rgb[2] << bs)
    return value.to_bytes(4, "big" if big else "little")
def frame(fmt):
    bar, body = pixel(fmt, BAR) * W, pixel(fmt, SCREEN) * W
    return (struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, W, H, 0)
            + bar * BAR_ROWS + body * (H - BAR_ROWS))
def serve(c):
    try:
        c.sendall(b"RFB 003.008\\n")
        read(c, 12)                      # the client's version
        c.sendall(bytes([1, 1]))         # one security type: None
        read(c, 1)
        c.sendall(struct.pack(">I", 0))  # security result: OK
        read(c, 1)                       # ClientInit
        fmt = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        c.sendall(struct.pack(">HH", W, H) + fmt + struct.pack(">I", 4) + b"fake")
        while True:
            kind = read(c, 1)[0]
            if kind == 0:                # SetPixelFormat
                fmt = read(c, 19)[3:]
            elif kind == 2:              # SetEncodings
                n = struct.unpack(">xH", read(c, 3))[0]
                read(c, 4 * n)
            elif kind == 3:              # FramebufferUpdateRequest
                if (read(c, 9)[0] == 0 or COLOUR) and fmt[0] == 32:  # a recorder's fake draws at each request
                    c.sendall(frame(fmt))
            elif kind == 4:              # KeyEvent
                read(c, 7)
            elif kind == 5:              # PointerEvent
                read(c, 5)
            elif kind == 6:              # ClientCutText
                read(c, struct.unpack(">3xI", read(c, 7))[0])
            else:                        # something this fake does not know: listen on, draw no more
                while c.recv(65536):
                    pass
                break
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# With a colour ("RRGGBB"), the fake display draws: a 64x48 screen of that colour, sent whole at each update
# request of a client that speaks only SetPixelFormat, SetEncodings and update requests (a recorder's). None:
# it never draws. Read when the display starts, in this process.
VNC_COLOUR: str | None = None


# The fake guest's dispo-files is the real one (guest/files.sh), run in its home directory; its X clipboard is
# a file there, so it never touches an X display of the host.
GUEST_FILES = guest.FILES_PATH
FILES_SH = Path(guest.__file__).parent / "files.sh"
FAKE_XCLIP = """#!/bin/sh
case " $* " in
*" -o "*) exec cat "$HOME/.clipboard" 2>/dev/null ;;
*" -i "*) for f; do :; done; exec cp -- "$f" "$HOME/.clipboard" ;;
esac
exit 2
"""


@dataclass
class FakeVmm:
    """Implements dispo.vmm.base.Vmm with a real, journaled, gated process that sleeps."""

    spec: MachineSpec
    ready_delay: float = 0.0
    kind: VmmKind = VmmKind.QEMU
    accel: Accel = Accel.TCG
    capabilities: frozenset[Capability] = frozenset({Capability.PAUSE, Capability.SNAPSHOT})
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _start: str = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def check(self) -> None:
        pass

    def start(self, journal: object) -> None:
        from dispo.infra.journal import Journal

        assert isinstance(journal, Journal)
        with open(self.spec.console_log, "ab") as console:
            spawned = processes.spawn_recorded(
                journal, [sys.executable, "-c", _FAKE_VM, f"{MARKER}{self.spec.session_id}", str(self.ready_delay),
                          f"dispo-{self.spec.session_id}", str(self.spec.workdir)],  # as QEMU's -name and paths
                what="fake-vmm", stdout=console, on_spawn=self._set, term_timeout="3")
        self._start = spawned.starttime

    def _set(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    def running(self) -> bool:
        return self._proc is not None and processes.is_same_process(self._proc.pid, self._start)

    def failure(self, what: str) -> GuestFailure:
        return GuestFailure(what, console_tail=self.console_tail(), hint="a fake VMM: see the test")

    def wait_exit(self, timeout: float | None = None) -> int | None:
        return processes.exit_status(self._proc, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            processes.terminate(self._proc.pid, self._start, term_timeout=3)
            self._proc.wait()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def console_tail(self, lines: int = 20) -> str:
        return tail(self.spec.console_log, lines)

    def pause(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    # A fake template: the "memory" is a file naming the session it was saved from.
    def save_state(self, dest: Path) -> None:
        self.pause()
        (dest / "memory.fake").write_text(f"saved from {self.spec.session_id}\n")

    def load_state(self, journal: object, src: Path) -> None:
        if not (src / "memory.fake").is_file():
            raise VmmError(f"no fake memory in {src}")
        self.start(journal)
        self.pause()

    def agent(self, timeout: float = 5.0) -> socket.socket:
        raise ConnectionRefusedError("the fake guest has no agent (fakes.machinery() checks none)")


# A hostile guest's dispo-files (the real one is guest/files.sh, which tests run through a wrapper): it
# answers a listing with 1.5 GiB, the clipboard with 1.5 GiB of error message, and counts an upload's bytes
# without keeping them (three uploads of 300 MB must not fill the host's /tmp).
FLOOD_BYTES = 1536 << 20
HOSTILE_FILES = ("sh", "-c", f"""
case "$1" in
list) exec head -c {FLOOD_BYTES} /dev/zero ;;
clip-get) exec head -c {FLOOD_BYTES} /dev/zero >&2 ;;
put) n=$(wc -c) && [ "$n" -eq "${{3:-$n}}" ] && printf '%s' "$2" ;;
*) exit 2 ;;
esac
""", "dispo-files")
# A display app that prints this much (lines, on stdout and stderr) and then its last line, before its display
# comes up.
APP_FLOOD_BYTES = 256 << 20
APP_LAST_LINE = "fake app: the last line"


@dataclass(frozen=True)
class FakeChannel:
    """The "guest" is a directory on the host; commands run there with the host's sh. `files`, if given,
    stands in for the guest's dispo-files; `app_output` bytes are what its display app prints first."""

    home: Path
    console: Path
    address: str = "127.0.0.1"
    files: tuple[str, ...] = ()
    app_output: int = 0

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in tail(self.console, 50):
            if not alive():
                raise VmmError("the guest stopped before it was ready")
            if time.monotonic() > deadline:
                raise VmmError(f"the fake guest was not ready within {timeout:.0f} s")
            time.sleep(0.02)

    def command(self, argv: Sequence[str], *, tty: bool = False) -> list[str]:
        words = list(argv) or ["sh"]
        if self.files and words[0] == guest.FILES_PATH:
            words = [*self.files, *words[1:]]
        elif words[0] == GUEST_FILES:  # the guest's real dispo-files, its X clipboard a file (FAKE_XCLIP)
            return ["sh", "-c", 'cd "$1" && shift && HOME=$PWD PATH="$PWD/.fake-bin:$PATH" exec sh "$@"',
                    "fake-guest", str(self.home), str(FILES_SH), *words[1:]]
        return ["sh", "-c", 'cd "$1" && shift && exec "$@"', "fake-guest", str(self.home), *words]

    def display(self, app: Sequence[str], *, vnc_socket: Path | None, geometry: str,
                attach: bool = False, forwards: Sequence[tuple[Path, int]] = ()) -> list[str]:
        vnc = f"COLOUR = {VNC_COLOUR!r}\n" + _FAKE_VNC
        argv = [sys.executable, "-c", vnc, str(vnc_socket)] if vnc_socket is not None else ["sleep", "1000000"]
        if vnc_socket is not None and forwards:  # a fake browser's debugging endpoint too (tests/fakecdp.py)
            argv = [sys.executable, "-c", FAKE_CDP + vnc, str(vnc_socket), *(str(f) for f, _ in forwards)]
        if not self.app_output:
            return argv
        half = self.app_output // 2
        return ["sh", "-c", f'yes "fake app: output" | head -c {half}; yes "fake app: errors" | head -c {half} >&2; '
                f'echo "{APP_LAST_LINE}"; exec "$@"', "fake-app", *argv]

    def save(self, state_path: Path) -> None:
        (state_path / "fake-guest.json").write_text(f'{{"home": "{self.home}"}}\n')

    def display_detached(self, app: Sequence[str], *, geometry: str, settle_s: int) -> list[str]:
        return ["true"]  # the fake display is started by the clone's display(attach=True)


@dataclass(frozen=True)
class FakeIdentity:
    home: Path
    console: Path
    files: tuple[str, ...] = ()
    app_output: int = 0

    def channel(self, address: str) -> GuestChannel:
        return FakeChannel(self.home, self.console, address, self.files, self.app_output)


def guest_home(home: Path) -> Path:
    """The fake guest's home directory, with the fake xclip its dispo-files uses."""
    home.mkdir(mode=0o700, exist_ok=True)
    (home / ".fake-bin").mkdir(exist_ok=True)
    xclip = home / ".fake-bin" / "xclip"
    xclip.write_text(FAKE_XCLIP)
    xclip.chmod(0o755)
    return home


def _identity(tx: Transaction, disk: Path, files: tuple[str, ...] = (), app_output: int = 0) -> Identity:
    home = guest_home(tx.state_path / "guest-home")
    return FakeIdentity(home, tx.state_path / "console.log", files, app_output)


def _network(tx: Transaction, policy: NetworkPolicy) -> GuestNetwork:
    # Creates nothing on the host: the fake guest lives on the host's loopback.
    return GuestNetwork(tx.session_id, f"dsp-{tx.session_id}", "06:00:00:00:00:01",
                        ipaddress.IPv4Interface("127.0.0.1/8"), ipaddress.IPv4Address("127.0.0.1"), ())


def machinery(ready_delay: float = 0.0, *, files: tuple[str, ...] = (), app_output: int = 0) -> Machinery:
    def create(cfg: Config, kind: VmmKind, spec: MachineSpec) -> Vmm:
        return FakeVmm(spec, ready_delay=ready_delay)

    def identity(tx: Transaction, disk: Path) -> Identity:
        return _identity(tx, disk, files, app_output)

    def renew(tx: Transaction, vmm: Vmm, net: GuestNetwork, timeout: float,
              alive: Callable[[], bool]) -> tuple[Identity, None]:
        vmm.resume()
        return identity(tx, Path()), None

    return Machinery(attach_network=_network, create_vmm=create, identity=identity,
                     network_missing=lambda tx, net: [], renew_identity=renew,
                     agent_check=lambda vmm, timeout, alive: None,
                     step_clock=lambda vmm, timeout, alive: None, name="fake")


def hostile_machinery() -> Machinery:
    """A guest whose dispo-files is HOSTILE_FILES: floods its answers, swallows uploads."""
    return machinery(files=HOSTILE_FILES)


def chatty_app_machinery() -> Machinery:
    """A guest whose display app prints APP_FLOOD_BYTES before its display comes up."""
    return machinery(app_output=APP_FLOOD_BYTES)


# A guest whose dispo-files plays "sound": it sends SOUND_BYTES and then holds the stream open, as the same
# process (for the tests that look for it in the journal and in /proc).
SOUND_BYTES = b"fake sound"
SOUND_FILES = ("sh", "-c", f'case "$1" in sound) printf "{SOUND_BYTES.decode()}"; exec sleep 600 ;; *) exit 2 ;; esac',
               "dispo-files")


def sound_machinery() -> Machinery:
    """A guest whose sound stream is SOUND_FILES's."""
    return machinery(files=SOUND_FILES)


def slow_machinery() -> Machinery:
    """A guest that takes 30 s to be ready: for stopping sessions while they start."""
    return machinery(ready_delay=30.0)


CHROMIUM_PROFILE = """\
image = "minimal"
memory_mib = 256
command = ["fake-browser"]
start_page = "about:blank"
display = "web"
ready_timeout_s = 30
automation = "cdp"
"""


def config_file(root: Path) -> Path:
    return root / "dispo.toml"


def config(root: Path, *, workspace: Path | None = None, backend: str = "copy") -> Config:
    """A workspace, state dir and profiles dir under root, the image "minimal" (a small real ext4 with a
    dummy kernel file) imported with the copy backend, and a profile "chromium" that shows a fake display."""
    ws, state, prof = workspace or root / "ws", root / "state", root / "profiles"
    prof.mkdir(parents=True, exist_ok=True)
    (prof / "chromium.toml").write_text(CHROMIUM_PROFILE)
    path = config_file(root)
    path.write_text(f'workspace = "{ws}"\nstate_dir = "{state}"\nprofiles_dir = "{prof}"\n'
                    f'[storage]\nbackend = "{backend}"\n')
    cfg = config_mod.load(path, env={})
    store = ImageStore(cfg)
    if not (cfg.images_dir / "minimal").exists():
        src = make_ext4(root / "minimal.ext4", "8M", {"etc/hostname": "fake\n"})
        kernel = root / "vmlinuz"
        kernel.write_bytes(b"not a kernel: the fake VMM does not read it\n")
        store.import_(src, "minimal", quiet=True, extra_files={"vmlinuz": kernel},
                      extra_meta={"kernel": "vmlinuz", "vmms": ["qemu"], "arch": "x86_64"})
    return cfg


def env(root: Path) -> dict[str, str]:
    """The environment for a `dispo`/`dispod` subprocess on this fake world."""
    return dict(os.environ, DISPO_CONFIG=str(config_file(root)), DISPO_STATE_DIR=str(root / "state"),
                DISPO_WORKSPACE=str(root / "ws"), PYTHONPATH=str(REPO))


def fake_vmm_pids(session_id: str = "", state_dir: Path | None = None) -> list[int]:
    """Fake VMM processes (of one session, or of one state dir: other tests may run beside this one)."""
    out = subprocess.run(["pgrep", "-f", f"{MARKER}{session_id}"], capture_output=True, text=True, check=False)
    pids = [int(p) for p in out.stdout.split()]
    if state_dir is None:
        return pids
    mine = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(state_dir) in cmdline:
            mine.append(pid)
    return mine


def control_socket(path: Path, answers: Sequence[bytes], *, greeting: bytes = b"", ends: bytes = b"\n"
                   ) -> threading.Thread:
    """A stand-in for a VMM's control socket (QEMU's QMP, Firecracker's API) at `path`: sends `greeting`, then
    for each request (read up to `ends`: a line, or an HTTP head) writes the next of `answers`; then closes.
    Join the thread it returns."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server, contextlib.suppress(OSError):
            conn.sendall(greeting)
            got = b""
            for answer in answers:
                while ends not in got:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    got += chunk
                got = got.split(ends, 1)[1]
                conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t
