"""What the runtime drives to make a guest: the network, the VMM, and the channel into the guest.

`Machinery` is the seam between the runtime's steps and the host: the real one (`REAL`) attaches a tap
behind NAT, creates a QEMU or Firecracker VMM through vmm/registry.py and talks to the guest over SSH with
keys made for the session. Tests swap the whole set for fakes (tests/fakes.py) to run the runtime, the
service, timeouts and cancellation in seconds without root; the real set is tested end to end.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dispo import guest as guest_files
from dispo import ssh
from dispo.config import Config
from dispo.errors import AgentError
from dispo.guest import agent
from dispo.infra.txn import Transaction
from dispo.net import GuestNetwork, NetworkPolicy, attach_network, missing_rules
from dispo.vmm import registry
from dispo.vmm.base import MachineSpec, Vmm, VmmKind

VNC_PORT = 5900
APP_LOG = "/tmp/dispo-app.log"  # in the guest: a detached app's output (a template's)


class GuestChannel(Protocol):
    """A host-side way into one guest over SSH: the display, interactive terminals, `dispo ssh`, the files
    (a command session's command goes through the guest's agent instead: runtime/steps.py `app`)."""

    @property
    def address(self) -> str: ...

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Until the guest answers; VmmError when `alive()` turns false or `timeout` passes."""

    def command(self, argv: Sequence[str], *, tty: bool = False) -> list[str]:
        """A host argv that runs `argv` in the guest as the unprivileged user, with its stdio."""

    def display(self, app: Sequence[str], *, vnc_socket: Path | None, geometry: str,
                attach: bool = False, forwards: Sequence[tuple[Path, int]] = ()) -> list[str]:
        """A host argv that runs `app` on a display: with vnc_socket, the guest's private VNC display
        forwarded to that unix socket; without, the host's $DISPLAY (X11 forwarding). With `attach`, the
        app already runs on the guest's display (a restored clone): it is handed `app` (the URL).
        `forwards`: more (unix socket, port on the guest's loopback) forwards for as long as the app runs
        (an automation session's debugging port)."""

    def save(self, state_path: Path) -> None:
        """Leave what `dispo ssh ID` needs in the session's state dir."""

    def display_detached(self, app: Sequence[str], *, geometry: str, settle_s: int) -> list[str]:
        """A host argv that starts `app` on the guest's private display detached from this channel (it must
        outlive the connection, for a template), and returns once the guest is idle (the app started), at
        most `settle_s` seconds; non-zero if the app is not running then."""


class Identity(Protocol):
    """Secrets made for one session and written into its disk before it boots."""

    def channel(self, address: str) -> GuestChannel: ...


@dataclass(frozen=True)
class SshChannel:
    keys: ssh.SessionKeys
    address: str
    mux_dir: Path | None = None  # where the app's SSH connection listens for more commands (see `mux`)

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> None:
        ssh.wait_ready(self.keys, self.address, timeout=timeout, alive=alive)

    @property
    def mux(self) -> Path | None:
        """The app's SSH connection, shared: a command then costs a channel, not an SSH handshake (seconds of
        guest CPU under emulation, where the viewer's downloads panel and --downloads ask every few seconds)."""
        return self.mux_dir / "m" if self.mux_dir is not None else None

    def command(self, argv: Sequence[str], *, tty: bool = False) -> list[str]:
        base = ssh.ssh_argv(self.keys, self.address, batch=not tty, tty=tty)
        if self.mux is not None:
            # ControlMaster=no: through the app's connection when it is up, else a connection of its own.
            base[-1:-1] = ["-o", "ControlMaster=no", "-o", f"ControlPath={self.mux}"]
        return [*base, ssh.remote_command(argv)] if argv else base

    def display(self, app: Sequence[str], *, vnc_socket: Path | None, geometry: str,
                attach: bool = False, forwards: Sequence[tuple[Path, int]] = ()) -> list[str]:
        base = ssh.ssh_argv(self.keys, self.address)
        if vnc_socket is not None:
            remote = [guest_files.APP_PATH, *(("attach",) if attach else ("web", geometry)), "--", *app]
            options = ["-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindMask=0177",
                       "-L", f"{vnc_socket}:127.0.0.1:{VNC_PORT}"]
        else:
            remote = [guest_files.APP_PATH, "x11", "--", *app]
            # -X is untrusted forwarding: the guest's clients cannot read other windows or the keyboard.
            options = ["-X", "-o", "ForwardX11Trusted=no", "-o", "ForwardX11Timeout=0"]
        for sock, port in forwards:
            options += ["-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindMask=0177",
                        "-L", f"{sock}:127.0.0.1:{port}"]
        if self.mux is not None:
            # The app's connection is the session's master connection (see `mux`); it ends with the app.
            options += ["-o", "ControlMaster=yes", "-o", f"ControlPath={self.mux}"]
        # ssh options go before the destination, which ssh_argv puts last.
        return [*base[:-1], *options, base[-1], ssh.remote_command(remote)]

    def save(self, state_path: Path) -> None:
        ssh.save_info(state_path, self.keys, self.address)

    def display_detached(self, app: Sequence[str], *, geometry: str, settle_s: int) -> list[str]:
        script = (f'setsid -f "$@" < /dev/null > {APP_LOG} 2>&1 && "$1" settle {int(settle_s)} '
                  f'&& kill -0 "$(cat /tmp/dispo-app.pid)"')
        return self.command(["sh", "-c", script, "sh", guest_files.APP_PATH, "web", geometry, "--", *app])


@dataclass(frozen=True)
class SshIdentity:
    keys: ssh.SessionKeys
    mux_dir: Path | None = None

    def channel(self, address: str) -> GuestChannel:
        return SshChannel(self.keys, address, self.mux_dir)


def _mux_dir(tx: Transaction) -> Path:
    """A short private directory for the app's SSH connection to listen in: a unix socket's path has at most
    107 bytes, ssh adds 17 while it binds, and the state dir can be deep. Its name is random (no one can make
    it first), it is root's alone, and it is journaled before it exists."""
    path = Path("/tmp") / f"dispo-{tx.session_id}-{secrets.token_hex(8)}"
    tx.journal.record("path", path=str(path), session=tx.session_id)
    path.mkdir(mode=0o700)
    return path


def ssh_identity(tx: Transaction, disk: Path) -> Identity:
    """Client and host keys for this session alone, written into its disk (no mount) before it boots."""
    keys = ssh.make_keys(tx.state_path, tx.session_id)
    ssh.install_keys(disk, keys)
    return SshIdentity(keys, _mux_dir(tx))


def agent_identity(tx: Transaction, vmm: Vmm, net: GuestNetwork, timeout: float,
                   alive: Callable[[], bool]) -> tuple[Identity, agent.AgentLink]:
    """A restored clone's identity, handed over by its agent: the guest is resumed (it was restored paused),
    then gets entropy, clock, hostname, new SSH keys (made here, for this session alone) and its address, in
    one request. The link stays open, the session's (its command runs through it); the caller closes it."""
    made: list[ssh.SessionKeys] = []

    def new() -> agent.NewIdentity:  # while the guest wakes and answers its first hello
        keys = ssh.make_keys(tx.state_path, tx.session_id)
        made.append(keys)
        return agent.NewIdentity(
            hostname=f"dispo-{tx.session_id}", mac=net.mac, address=net.guest.with_prefixlen,
            gateway=str(net.gateway), dns=tuple(str(d) for d in net.dns), host_key=keys.host_key.read_bytes(),
            user_key=keys.client_key.with_suffix(".pub").read_text())
    vmm.resume()
    link = agent.AgentLink(vmm.agent(timeout=5.0))
    try:
        agent.give(link, new, timeout=timeout, alive=alive)
    except BaseException:
        link.close()
        raise
    return SshIdentity(made[0], _mux_dir(tx)), link


def agent_connect(vmm: Vmm, timeout: float, alive: Callable[[], bool]) -> agent.AgentLink | None:
    """A link to a booting guest's agent once it answers (the init starts it when the guest is set up: its
    answer is the guest's readiness); None when the guest has no agent channel (Firecracker boots without
    one) or its agent is older than this protocol (an image built by an older dispo): SSH then."""
    try:
        link = agent.AgentLink(vmm.agent(timeout=5.0))
    except OSError:
        return None
    try:
        if link.hello(timeout, alive, too_old_ok=True):
            return link
    except BaseException:
        link.close()
        raise
    link.close()
    return None


def agent_answers(vmm: Vmm, timeout: float, alive: Callable[[], bool]) -> None:
    """The guest's agent answers on its channel (checked before a template is saved: its clones need it), and
    the guest's filesystems are synced through it: a template saved with dirty pages and an open journal
    transaction leaves every clone to write them back the moment its clock is stepped forward (the writeback
    and journal timers all expire at once), on the vCPU its identity needs."""
    try:
        link = agent.AgentLink(vmm.agent(timeout=5.0))
    except OSError as e:
        raise AgentError(f"the guest's agent channel cannot be opened ({e})",
                               hint="rebuild the image with this dispo ('dispo image build NAME --force')") from None
    try:
        link.hello(timeout, alive)
        if (rc := agent.run_to_end(link, "sync", timeout)) != 0:
            raise AgentError(f"the guest's sync before the save failed (exit status {rc})")
    finally:
        link.close()


def agent_clock(vmm: Vmm, timeout: float, alive: Callable[[], bool]) -> None:
    """Step a resumed guest's clock to the host's (it stood still while the guest was paused)."""
    link = agent.AgentLink(vmm.agent(timeout=5.0))
    try:
        link.hello(timeout, alive)
        agent.step_clock(link)
    finally:
        link.close()


def _attach(tx: Transaction, policy: NetworkPolicy) -> GuestNetwork:
    return attach_network(tx, policy)


def _create_vmm(cfg: Config, kind: VmmKind, spec: MachineSpec) -> Vmm:
    return registry.create(cfg, kind, spec)


def _rules_missing(tx: Transaction, net: GuestNetwork) -> list[str]:
    return missing_rules(tx.cfg.state_dir, tx.session_id)


@dataclass(frozen=True)
class Machinery:
    attach_network: Callable[[Transaction, NetworkPolicy], GuestNetwork]
    create_vmm: Callable[[Config, VmmKind, MachineSpec], Vmm]
    identity: Callable[[Transaction, Path], Identity]
    # What of the session's isolation is gone ([] = intact), asked about once a second while it runs: if
    # someone flushes the ruleset, the guest would be unfiltered, so the session ends (fails closed).
    network_missing: Callable[[Transaction, GuestNetwork], list[str]]
    # A restored clone's identity through its in-guest agent (resumes the paused guest first).
    renew_identity: Callable[[Transaction, Vmm, GuestNetwork, float, Callable[[], bool]],
                             tuple[Identity, agent.AgentLink | None]] = agent_identity
    # That the agent answers (before a template is saved).
    agent_check: Callable[[Vmm, float, Callable[[], bool]], None] = agent_answers
    # The guest's clock stepped to the host's (a pooled guest, resumed at hand-out).
    step_clock: Callable[[Vmm, float, Callable[[], bool]], None] = agent_clock
    # A booted guest's agent once it answers, kept for the session's command (None: the guest has none).
    agent_link: Callable[[Vmm, float, Callable[[], bool]], agent.AgentLink | None] = agent_connect
    name: str = "real"


REAL = Machinery(attach_network=_attach, create_vmm=_create_vmm, identity=ssh_identity,
                 network_missing=_rules_missing, renew_identity=agent_identity, agent_check=agent_answers,
                 step_clock=agent_clock, agent_link=agent_connect)
