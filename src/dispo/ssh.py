"""SSH into a session's guest with keys that exist only for that session.

Before boot, dispo makes two ed25519 key pairs in the session state directory: the client key, whose public
half becomes /home/user/.ssh/authorized_keys in the session's disk, and the guest's host key, written to
/etc/ssh/ssh_host_ed25519_key. Both are written with debugfs straight into the ext4 image (no mount). The
host therefore knows the guest's host key in advance: ssh runs with StrictHostKeyChecking=yes against a
per-session known_hosts entry under the alias dispo-<id>, so a guest is never trusted on first use and no
user's ~/.ssh is read or written. The keys go with the state directory when the session ends.
"""

from __future__ import annotations

import json
import logging
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dispo import guest
from dispo.errors import StorageError, VmmError
from dispo.infra.proc import minimal_env, run

log = logging.getLogger(__name__)

SSH_HINT = "install openssh-client"
E2FS_HINT = "install e2fsprogs"
SSH_INFO = "ssh.json"


@dataclass(frozen=True)
class SessionKeys:
    directory: Path
    alias: str

    @property
    def client_key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.directory / "host_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"


def make_keys(state_path: Path, session_id: str) -> SessionKeys:
    """Generate the client key and the guest host key into state_path/ssh (mode 0700)."""
    keys = SessionKeys(state_path / "ssh", f"dispo-{session_id}")
    keys.directory.mkdir(mode=0o700)
    for path, comment in ((keys.client_key, f"dispo-{session_id}-client"), (keys.host_key, keys.alias)):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], hint=SSH_HINT)
    host_pub = keys.host_key.with_suffix(".pub").read_text().split()
    keys.known_hosts.write_text(f"{keys.alias} {host_pub[0]} {host_pub[1]}\n")
    return keys


def install_keys(disk: Path, keys: SessionKeys) -> None:
    """Write authorized_keys and the host key into the (not running) session disk with debugfs."""
    auth = f"{guest.USER_HOME}/.ssh/authorized_keys"
    uid = str(guest.USER_UID)
    files = (
        (keys.client_key.with_suffix(".pub"), auth, uid, "0100600"),
        (keys.host_key, guest.HOST_KEY, "0", "0100600"),
        (keys.host_key.with_suffix(".pub"), guest.HOST_KEY + ".pub", "0", "0100644"),
    )
    script = []
    for src, dest, owner, mode in files:
        # rm first: debugfs `write` refuses to replace a file (a missing one only prints a message).
        script += [f"rm {dest}", f"write {src} {dest}", f"sif {dest} uid {owner}", f"sif {dest} gid {owner}",
                   f"sif {dest} mode {mode}"]
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=keys.directory) as f:
        f.write("\n".join(script) + "\n")
        f.flush()
        run(["debugfs", "-w", "-f", f.name, disk], hint=E2FS_HINT)
    # debugfs reports most failures only in its output: read the result back instead of trusting it.
    got = run(["debugfs", "-R", f"cat {auth}", disk], hint=E2FS_HINT).stdout
    if got.strip() != keys.client_key.with_suffix(".pub").read_text().strip():
        raise StorageError(f"could not write {auth} into the session disk {disk}",
                           hint=f"the image needs a '{guest.USER}' account with {guest.USER_HOME}/.ssh")


# A connection made once the guest answered (an app, a command, `dispo ssh`) gets this long for the TCP connect
# and sshd's banner: its sshd re-executes per connection, which takes seconds of emulated CPU on a loaded host
# (a Chromium clone's display failed with 3 s). Probes for readiness keep short timeouts and retry instead.
CONNECT_TIMEOUT_S = 20


def ssh_argv(keys: SessionKeys, address: str, *, batch: bool = True, tty: bool = False,
             connect_timeout: int = CONNECT_TIMEOUT_S) -> list[str]:
    argv = ["ssh", "-F", "/dev/null", "-i", str(keys.client_key), "-l", guest.USER,
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={keys.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias={keys.alias}", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    argv.append("-t" if tty else "-T")
    argv.append(address)
    return argv


def remote_command(cmd: Sequence[str]) -> str:
    """ssh joins its arguments with spaces for the remote shell; quoting each keeps them intact."""
    return shlex.join(cmd)


def port_open(address: str, port: int = 22, timeout: float = 0.5) -> bool:
    """A cheap probe before starting ssh: a SYN lost while the guest boots costs ssh a 1 s retransmit."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        time.sleep(0.1)
        return False


def wait_port(address: str, timeout: float) -> bool:
    """Until the guest's sshd listens, at most `timeout` s: a guest is ready when its agent answers, which may
    be a moment before its sshd (started after the agent, or re-executing on a clone's new host key)."""
    deadline = time.monotonic() + timeout
    while not port_open(address):
        if time.monotonic() > deadline:
            return False
    return True


def wait_ready(keys: SessionKeys, address: str, *, timeout: float, alive: Callable[[], bool]) -> float:
    """Seconds until `ssh ... true` succeeds; VmmError when the VMM dies or `timeout` passes."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = ""
    while True:
        if not alive():
            raise VmmError("the guest stopped before it was ready")
        left = deadline - time.monotonic()
        if left <= 0:
            raise VmmError(f"the guest did not answer on SSH within {timeout:.0f} s"
                           + (f" (last ssh error: {last})" if last else ""),
                           hint="the console log is shown above; a slow host may need a longer --ready-timeout")
        if not port_open(address):
            last = "port 22 not open yet"
            continue
        try:
            # A probe bounded by its timeout, in the caller's thread; not journaled: it ends before this does.
            proc = subprocess.run([*ssh_argv(keys, address, connect_timeout=max(1, min(3, int(left)))), "true"],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, env=minimal_env(),
                                  timeout=max(left, 1) + 2, check=False)
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode == 0:
            return time.monotonic() - t0
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        time.sleep(0.2)


def save_info(state_path: Path, keys: SessionKeys, address: str) -> None:
    """What `dispo ssh ID` needs, next to the keys."""
    (state_path / SSH_INFO).write_text(json.dumps({"address": address, "alias": keys.alias,
                                                   "keys": str(keys.directory)}) + "\n")


def load_info(state_path: Path) -> tuple[SessionKeys, str] | None:
    try:
        data = json.loads((state_path / SSH_INFO).read_text())
        return SessionKeys(Path(data["keys"]), str(data["alias"])), str(data["address"])
    except (OSError, ValueError, KeyError):
        return None
