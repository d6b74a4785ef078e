"""A session's bring-up as a named, ordered list of steps, and its supervision once it runs.

    BOOT:  validate -> disk -> volume -> identity -> network -> vmm.start -> guest.ready -> app

`BOOT` is the one step list. Every other way to bring a guest up is an edit of it (`swap`, `drop`,
`insert_after`, as firecracker-go-sdk's handler lists), never a list written out again: a restore from a
template (runtime/warm.py `restore_steps`), a template build (`template_steps`), a guest held in the warm
pool (runtime/pool.py `pool_steps`).

Each step reads and fills one `Bringup`, the bring-up record, and records every host object in the
session's journal before it creates it (through the layer that owns it). Steps never touch the live
session: it reads what they recorded (its guest's address, VMM, channel, kept volume, viewer URL). The
runtime checks for cancellation between steps and inside the waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from dispo import guest, ssh
from dispo.config import Config
from dispo.errors import (
    AgentError,
    DispoError,
    GuestFailure,
    InvalidInput,
    NetworkError,
    NotFound,
    StorageError,
    VmmError,
)
from dispo.guest.agent import MAX_COMMAND, AgentCommand, AgentLink
from dispo.infra.txn import Transaction
from dispo.names import format_size
from dispo.net import GuestNetwork, rules_gone_reason
from dispo.net.capture import RequestLog
from dispo.profiles import DisplayMode
from dispo.runtime.app import (
    AUTOMATION_SOCKET,
    DEFAULT_GEOMETRY,
    OUTPUT_CAP,
    SSH_LOST,
    VNC_SOCKET,
    AppProcess,
    app_env,
    vnc_greeting,
)
from dispo.runtime.cancel import CancelToken
from dispo.runtime.events import EndKind, EventKind
from dispo.runtime.machinery import GuestChannel, Identity, Machinery
from dispo.runtime.request import SessionRequest, Stdio, find_image
from dispo.storage import disks, files, volumes, workspace
from dispo.storage.images import Image, Provenance
from dispo.storage.recordings import Recording
from dispo.storage.templates import Template
from dispo.vmm.accel import Accel
from dispo.vmm.base import MachineSpec, NetAttachment, Vmm, VmmKind
from dispo.vmm.registry import choose_backend, kernel_for

POLL_S = 0.2
RULES_EVERY = 5  # polls: the session's firewall rules and the workspace's free space are checked once a second
MIN_FREE = 32 << 20  # bytes left in the workspace under which a session ends rather than fail in odd ways


class Handover:
    """How a guest held in the warm pool is given to the request that claims it: `LiveSession.claim` gives,
    the `pool.hold` step waits for it."""

    def __init__(self) -> None:
        self.given = threading.Event()
        self.request: SessionRequest | None = None
        self.at = 0.0  # when it was given (time.time())

    def give(self, request: SessionRequest) -> None:
        self.request, self.at = request, time.time()
        self.given.set()


@dataclass
class Bringup:
    """The bring-up record: what the steps of one session share, filled in step by step. The inputs come
    first; the rest is what the steps found and made, which the live session reads (and nothing else)."""

    cfg: Config
    machinery: Machinery
    request: SessionRequest
    tx: Transaction
    cancel: CancelToken
    emit: Callable[..., None]          # emit(kind, message, **fields)
    # The session's viewer host (runtime/live.py ViewerHost), bound to this session; None when it has none.
    publish: Callable[[Path], str] | None  # serve the display forwarded to this VNC socket: its URL
    withdraw: Callable[[], None]       # stop serving it (on unwind)
    output: Callable[[str, bytes], None]  # where a captured app's output goes (stream, data)
    status: Callable[[], dict[str, Any]]  # the session's status, for events that carry it
    handover: Handover = field(default_factory=Handover)
    t0: float = field(default_factory=time.monotonic)
    image: Image | None = None
    kind: VmmKind = VmmKind.QEMU
    kernel: Path | None = None
    disk_dir: Path | None = None
    identity: Identity | None = None
    net: GuestNetwork | None = None
    vmm: Vmm | None = None
    channel: GuestChannel | None = None
    # The guest's agent, once it answered (a clone's after its identity, a booted guest's at readiness): the
    # session's command runs through it. None: SSH (a display, a terminal, an image without the agent).
    agent: AgentLink | None = None
    ssh_ready: bool = False            # the guest answered over SSH (what the display and terminals need)
    app: AppProcess | AgentCommand | None = None
    template: Template | None = None   # the template this session restores from (runtime/warm.py)
    volume: Path | None = None         # a volume kept on purpose (--keep), attached after the root disk
    kept: list[str] = field(default_factory=list)  # what the session keeps on purpose, for the receipt
    request_log: RequestLog | None = None  # with --log-requests: the guest's requests, from its first frame
    viewer_url: str | None = None      # where the app's display was published
    automation_socket: Path | None = None  # with request.automation: the app's debugging port, forwarded here
    recording: Recording | None = None  # with request.record: the video kept when the session ended
    finished: str = ""                 # set by a last step that ends the session itself (a template build)

    def alive(self) -> bool:
        """The VMM runs and nobody asked the session to stop: what every wait checks."""
        return self.vmm is not None and self.vmm.running() and not self.cancel.is_set()


class Origin(StrEnum):
    """Where a session's guest comes from (its status' `start`), and so which edit of BOOT it runs:
    runtime/plan.py chooses."""

    BOOT = "boot"
    RESTORE = "restore"   # runtime/warm.py restore_steps
    POOL = "pool"         # restored, then held in the warm pool (runtime/pool.py pool_steps)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Bringup], None]


@dataclass(frozen=True)
class Steps:
    """A named, ordered step list, and the edits that make a variant of it (each returns a new list). An
    edit names a step that is not there, or makes a name appear twice: ValueError, at import time."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"step names appear twice in {self.names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, name: str) -> Step:
        return self.steps[self._index(name)]

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no step {name!r} in {self.names}") from None

    def swap(self, name: str, step: Step) -> Steps:
        """`step` in the place of the step `name`."""
        i = self._index(name)
        return replace(self, steps=(*self.steps[:i], step, *self.steps[i + 1:]))

    def drop(self, name: str) -> Steps:
        i = self._index(name)
        return replace(self, steps=(*self.steps[:i], *self.steps[i + 1:]))

    def insert_after(self, name: str, step: Step) -> Steps:
        i = self._index(name) + 1
        return replace(self, steps=(*self.steps[:i], step, *self.steps[i:]))


def validate(b: Bringup) -> None:
    """The image and its kernel files exist and suit the backend (they may have changed since the request)."""
    workspace.ensure(b.cfg)  # before the image is read: making the workspace's pool moves its images there
    image = find_image(b.cfg, b.request.image)
    b.image, b.kind = image, choose_backend(b.request.backend, image)
    b.kernel = kernel_for(image, b.kind)
    if b.kernel is None:
        raise InvalidInput(f"image {image.name!r} has no kernel, so it cannot boot",
                           hint="build a bootable image with 'dispo image build minimal'")
    for what, path in (("kernel", b.kernel), ("initrd", image.initrd_path)):
        if path is not None and not path.is_file():
            raise NotFound(f"image {image.name!r}: {what} file {path} is missing",
                           hint=f"rebuild the image ('dispo image build {image.name} --force')")


def disk(b: Bringup) -> None:
    assert b.image is not None
    b.disk_dir = disks.clone(b.tx, b.image)


def volume(b: Bringup) -> None:
    """The volume the session keeps on purpose (--keep NAME), made on first use and locked while it runs."""
    if b.request.keep:
        b.volume = volumes.attach(b.tx, b.request.keep)
        b.kept.append(volumes.describe(b.volume))


def identity(b: Bringup) -> None:
    assert b.disk_dir is not None
    from dispo.storage.layout import ROOTFS

    b.identity = b.machinery.identity(b.tx, b.disk_dir / ROOTFS)


def network(b: Bringup) -> None:
    b.net = b.machinery.attach_network(b.tx, b.request.policy)
    if b.request.log_requests:
        _log_requests(b, b.net.tap)


def _log_requests(b: Bringup, tap: str) -> None:
    """Watch the guest's side of the network from its first frame (net/capture.py); stopped on unwind."""
    log = RequestLog(tap)
    try:
        log.start()
    except OSError as e:
        raise NetworkError(f"cannot watch {tap} for --log-requests: {e.strerror or e}",
                           hint="logging requests needs CAP_NET_RAW (run dispo as root)") from None
    b.tx.stack.callback(log.stop)
    b.request_log = log


def machine_spec(b: Bringup, *, agent: bool = False, template: bool = False) -> MachineSpec:
    """The machine of this session; `agent`: with the identity agent's channel (templates and their clones;
    QEMU guests always have it); `template`: its state will be saved (a template build)."""
    assert b.image is not None and b.kernel is not None and b.net is not None and b.disk_dir is not None
    from dispo.storage.layout import ROOTFS

    r, image, net = b.request, b.image, b.net
    extra: dict[str, str] = {}
    if r.display is not DisplayMode.NONE:
        # An app on a display (a browser) is what dispo exists to contain: a backend may refuse to run it
        # with less isolation than it can give (Firecracker without its jailer).
        extra["untrusted_app"] = "1"
    if agent:
        extra["agent"] = "1"
    if template:
        extra["template"] = "1"
    return MachineSpec(
        session_id=b.tx.session_id, kernel=b.kernel, rootfs=b.disk_dir / ROOTFS, workdir=b.tx.state_path,
        cmdline=(*image.cmdline, *net.kernel_args(), f"dispo.hostname=dispo-{b.tx.session_id}", *r.cmdline()),
        initrd=image.initrd_path, memory_mib=r.memory_mib, vcpus=r.vcpus, nets=(NetAttachment(net.tap, net.mac),),
        volumes=(b.volume,) if b.volume is not None else (), extra=extra)


def new_vmm(b: Bringup, spec: MachineSpec) -> Vmm:
    """A checked VMM, its stop registered; `b.vmm` once it runs (the session's backend and accelerator)."""
    vmm = b.machinery.create_vmm(b.cfg, b.kind, spec)
    vmm.check()
    # Runs before the journal unwinds the network and the disk. A disposable guest is killed, not shut down:
    # its disk is thrown away, so nothing it would write on the way down matters. Only a kept volume's writes
    # must reach their file: that guest is asked to power off first.
    b.tx.stack.callback(vmm.stop if spec.volumes else vmm.kill)
    return vmm


def vmm_start(b: Bringup, *, agent: bool = False, template: bool = False) -> None:
    vmm = new_vmm(b, machine_spec(b, agent=agent, template=template))
    vmm.start(b.tx.journal)
    b.vmm = vmm


def needs_ssh(r: SessionRequest) -> bool:
    """Whether the session's app goes over SSH: a display (its forward, X11), a terminal, a debugging port, or
    a command too long for the agent; every other command runs through the guest's agent."""
    return (r.display is not DisplayMode.NONE or r.tty or bool(r.automation)
            or len(ssh.remote_command(r.command).encode()) > MAX_COMMAND)


def keep_agent(b: Bringup, link: AgentLink | None) -> None:
    """The session's link to its guest's agent, closed on unwind."""
    if link is not None:
        b.tx.stack.callback(link.close)
    b.agent = link


def guest_ready(b: Bringup, *, ssh_too: bool = False) -> None:
    """Until the guest is ready: its agent answered (a clone's did, after its identity), or, for what goes
    over SSH (needs_ssh, `ssh_too`: a template build, whose clones must find sshd running), SSH answered."""
    assert b.identity is not None and b.net is not None and b.vmm is not None
    vmm = b.vmm
    channel = b.identity.channel(str(b.net.guest.ip))
    t = time.monotonic()
    try:
        if ssh_too or needs_ssh(b.request):
            channel.wait_ready(b.request.ready_timeout_s, b.alive)
            b.ssh_ready = True
        elif b.agent is None and b.image is not None and b.image.provenance is Provenance.BUILT:
            # Every image dispo builds has the agent; an older one's answers that it is (then SSH).
            keep_agent(b, b.machinery.agent_link(vmm, b.request.ready_timeout_s, b.alive))
        if b.agent is None and not b.ssh_ready:
            channel.wait_ready(b.request.ready_timeout_s, b.alive)
            b.ssh_ready = True
    except VmmError as e:
        b.cancel.check()  # `alive` also turns false when the session is stopped: that is no guest failure
        if isinstance(e, GuestFailure):
            raise
        if vmm.running():
            raise vmm.failure(e.message) from None
        raise vmm.failure(f"{e.message}: {vmm.kind.value} exited with status {vmm.wait_exit(0)}") from None
    channel.save(b.tx.state_path)
    b.channel = channel
    now = time.monotonic()
    b.emit(EventKind.READY, f"ready in {now - b.t0:.1f} s (guest {channel.address}, {vmm.kind.value}/"
                            f"{vmm.accel.value})",
           address=channel.address, backend=vmm.kind.value, accel=vmm.accel.value, ready_s=round(now - b.t0, 3),
           boot_s=round(now - t, 3), by="ssh" if b.ssh_ready else "agent")
    if vmm.accel is Accel.TCG and b.request.display is not DisplayMode.NONE:
        b.emit(EventKind.NOTICE, "no usable KVM here: the guest runs under TCG (emulation), so the app is slow; "
                                 "a browser takes about 30 s to show its first page", accel=vmm.accel.value)


def ensure_ssh(b: Bringup) -> None:
    """SSH answers before the app uses it: a guest found ready by its agent may still be starting sshd (a
    pooled guest handed to a terminal, a clone whose sshd re-executes on its new host key)."""
    assert b.channel is not None and b.vmm is not None
    if b.ssh_ready:
        return
    try:
        b.channel.wait_ready(b.request.ready_timeout_s, b.alive)
    except VmmError as e:
        b.cancel.check()
        if isinstance(e, GuestFailure):
            raise
        raise b.vmm.failure(e.message) from None
    b.ssh_ready = True


def app(b: Bringup) -> None:
    assert b.channel is not None and b.vmm is not None
    r = b.request
    if b.agent is not None and not needs_ssh(r):
        # The command through the guest's agent: no SSH, no host process. The caller's stdin when the command
        # is in the caller's terminal (as ssh would read it), else none.
        try:
            cmd = AgentCommand(b.agent, ssh.remote_command(r.command), output=b.output, cap=OUTPUT_CAP,
                               stdin_fd=0 if r.stdio is Stdio.TERMINAL else None, timeout=r.ready_timeout_s,
                               on_over=b.cancel.nudge)
        except AgentError:
            # The channel broke as the command started: first whether the guest's VMM is going (as supervise).
            if (status := b.vmm.wait_exit(2)) is not None:
                raise guest_stopped(b, "the command", status) from None
            raise
        b.tx.stack.callback(cmd.stop)
        b.app = cmd
        return
    ensure_ssh(b)
    if r.display is DisplayMode.WEB:
        web_display(b)
    elif r.display is DisplayMode.X11:
        argv = b.channel.display(r.command, vnc_socket=None, geometry=DEFAULT_GEOMETRY)
        b.app = AppProcess(b.tx, argv, what="app-ssh", env=app_env(x11=True))
        b.emit(EventKind.NOTICE, f"app on display {app_env(x11=True)['DISPLAY']}")
        if r.features.audio:
            b.emit(EventKind.NOTICE, "no sound in x11 mode: the profile's sound plays in the web viewer only "
                                     "(--display web)")
    else:
        # An interactive shell owns the caller's terminal. Otherwise the output is captured into events, so
        # the CLI can escape the guest's control characters before they reach a terminal (and writes raw
        # bytes to a pipe); a command in the caller's terminal still reads the caller's stdin.
        interactive = r.stdio is Stdio.TERMINAL and r.tty
        argv = b.channel.command(r.command, tty=r.tty)
        b.app = AppProcess(b.tx, argv, what="command-ssh", terminal=interactive,
                           output=None if interactive else b.output, keep_stdin=r.stdio is Stdio.TERMINAL,
                           on_exit=b.cancel.nudge)


def web_display(b: Bringup, *, attach: bool = False) -> None:
    """The app on the guest's private display, forwarded to a socket and published to the viewer; with
    `attach`, the app already runs there (a clone of a template) and is handed the session's URL."""
    assert b.channel is not None and b.vmm is not None
    ensure_ssh(b)
    sock = b.tx.state_path / VNC_SOCKET
    sock.unlink(missing_ok=True)
    forwards: tuple[tuple[Path, int], ...] = ()
    if b.request.automation:
        debug = b.tx.state_path / AUTOMATION_SOCKET
        debug.unlink(missing_ok=True)
        forwards = ((debug, guest.DEBUG_PORT),)
    argv = b.channel.display(b.request.command, vnc_socket=sock, geometry=DEFAULT_GEOMETRY, attach=attach,
                             forwards=forwards)
    app = b.app = AppProcess(b.tx, argv, what="app-ssh")
    deadline = time.monotonic() + b.request.ready_timeout_s
    while not vnc_greeting(sock):
        b.cancel.check()
        if (rc := app.poll()) is not None:
            raise app.failure(f"the app's display did not start (ssh exited with status {rc})")
        if not b.vmm.running():
            raise b.vmm.failure("the guest stopped while its display started")
        if time.monotonic() > deadline:
            raise app.failure(f"no VNC display from the guest after {b.request.ready_timeout_s:.0f} s")
        time.sleep(0.3)
    if forwards:  # the forward is up with the display's (ExitOnForwardFailure); the browser answers on it later
        b.automation_socket = forwards[0][0]
    if b.publish is not None:
        url = b.publish(sock)
        b.tx.stack.callback(b.withdraw)
        (b.tx.state_path / "viewer.url").write_text(url + "\n")
        b.viewer_url = url
        b.emit(EventKind.VIEWER, f"viewer at {url}", url=url)


BOOT = Steps((
    Step("validate", validate), Step("disk", disk), Step("volume", volume), Step("identity", identity),
    Step("network", network),
    Step("vmm.start", vmm_start), Step("guest.ready", guest_ready), Step("app", app),
))
STEPS = BOOT  # the name tests, bench and callers knew it by


def guest_stopped(b: Bringup, what: str, status: int | None) -> GuestFailure:
    """The session's error when its guest's VMM exited under `what` (the command, the app)."""
    assert b.vmm is not None
    return b.vmm.failure(f"the guest stopped while {what} ran ({b.vmm.kind.value} exit status {status})")


def supervise(b: Bringup, last_activity: Callable[[], float]) -> tuple[int | None, str, EndKind]:
    """Until the session ends: (exit status or None, why, how). Raises when the guest dies under the app.
    `last_activity`: when someone last used the session (monotonic), for the idle timeout."""
    assert b.app is not None and b.vmm is not None
    assert b.net is not None
    r = b.request
    started = time.monotonic()
    what = "the command" if r.display is DisplayMode.NONE and not r.profile else f"{r.profile or 'the app'}"
    polls = 0
    while True:
        if b.cancel.wait(POLL_S):
            return None, b.cancel.reason, b.cancel.kind
        polls += 1
        if polls % RULES_EVERY == 0:
            try:
                missing = b.machinery.network_missing(b.tx, b.net)
            except DispoError as e:  # rules that cannot be read cannot be trusted either
                missing = [f"the ruleset could not be read: {e.message}"]
            if missing:
                raise NetworkError(rules_gone_reason(missing),
                                   hint="something removed dispo's nftables rules (nft flush ruleset?); the "
                                        "session was ended so its guest is never unfiltered")
            _check_space(b)
        rc = b.app.poll()
        if isinstance(b.app, AgentCommand) and rc is not None and b.app.error:
            # The channel broke: first whether the guest's VMM is going (its socket closes as it exits).
            if (status := b.vmm.wait_exit(2)) is not None:
                raise guest_stopped(b, what, status)
            raise AgentError(b.app.error, hint="the guest's agent broke its protocol; the session was ended")
        if rc is not None:
            if rc == SSH_LOST and not b.vmm.running():
                raise guest_stopped(b, what, b.vmm.wait_exit(0))
            return rc, f"{what} exited with status {rc}", EndKind.EXITED
        if not b.vmm.running():
            raise guest_stopped(b, what, b.vmm.wait_exit(1))
        now = time.monotonic()
        if r.max_lifetime_s and now - started >= r.max_lifetime_s:
            return None, f"maximum lifetime of {r.max_lifetime_s:g} s reached", EndKind.LIFETIME
        if r.idle_timeout_s and now - last_activity() >= r.idle_timeout_s:
            return None, f"idle for {r.idle_timeout_s:g} s (no viewer and no input)", EndKind.IDLE


def _check_space(b: Bringup) -> None:
    """A guest that fills the workspace gets I/O errors (QEMU: werror=report); the session ends with a message
    that says why, instead of an app failing in odd ways or, worse, a VMM paused forever."""
    assert b.disk_dir is not None
    # In the workspace's pool (a sparse file) the disk's filesystem may claim more room than the host has left.
    free = min(files.free_bytes(b.disk_dir), files.free_bytes(b.cfg.workspace))
    if free < MIN_FREE:
        raise StorageError(f"the workspace {b.cfg.workspace} is full ({format_size(free)} left): the session was "
                           f"ended", hint="free space in the workspace, or give it a bigger filesystem")
