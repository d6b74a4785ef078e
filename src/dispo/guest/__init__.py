"""Files dispo installs into guest images (the early-boot init, sshd settings), read from this package."""

from __future__ import annotations

from importlib import resources

INIT_PATH = "/usr/lib/dispo/init"          # where the image carries the init; kernel arg init=...
APP_PATH = "/usr/local/bin/dispo-app"       # the display launcher (app.sh) in browser images
AGENT_PATH = "/usr/lib/dispo/agent"         # the identity agent (agent.pl), started by the init
OPEN_PATH = "/usr/local/bin/dispo-open"     # hands a URL to the running Chromium (open.pl), browser images
SETUP_PATH = "/usr/lib/dispo/browser-setup"  # per-session browser settings at boot (browser-setup.sh)
FILES_PATH = "/usr/lib/dispo/files"         # downloads, uploads, clipboard, sound for the host (files.sh)
# An automation session's browser listens for its debugging protocol (CDP, WebDriver BiDi) on this port of the
# guest's loopback only; dispo reaches it through the session's SSH (a forward to a socket in the state dir).
DEBUG_PORT = 9222
USER = "user"                               # the unprivileged account sessions run as
USER_UID = 1000
USER_HOME = f"/home/{USER}"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"  # written per session by dispo.ssh before boot

# Only the per-session host key, only key authentication, never root.
SSHD_CONFIG = f"""\
# Written by dispo: sessions log in with a per-session key as '{USER}'.
HostKey {HOST_KEY}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AuthenticationMethods publickey
# No PAM stack to run in an init-less guest; the account has password '*' (not locked) for this reason.
UsePAM no
UseDNS no
PrintMotd no
"""


def resource(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def init_script() -> bytes:
    return resource("init.sh")
