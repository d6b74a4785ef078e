"""Listening: the root-only unix socket always, TCP only when asked (`--listen HOST:PORT`).

The sockets are bound by `bind_unix` / `bind_tcp` before the server starts, so the TCP port (0 picks a free
one) is known for the URLs, and each listener carries its own rules (guard.Listener): the unix socket needs no
token, TCP needs the token and a Host header naming it. Each has its own connection cap, so a flood of TCP
clients never locks root out of the unix socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from dispo.errors import InvalidInput, PermissionProblem
from dispo.web.guard import CONNECTIONS, GuardedSite, Limits, Listener, ListenerKind, allowed_hosts

BACKLOG = 128
SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> TcpAddress:
    """"127.0.0.1:8686", "[::1]:8686" or "localhost:8686"; a wildcard address is refused because the Host
    header is checked against the address (DNS rebinding), and a wildcard has none to check against."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text)
        if not sep or not 0 <= port <= 65535:
            raise ValueError(port_text)
    except ValueError:
        raise InvalidInput(f"--listen {text!r} is not HOST:PORT",
                           hint="give an IP address and a port, e.g. --listen 127.0.0.1:8686") from None
    if ip.is_unspecified:
        raise InvalidInput(f"--listen {text!r} listens on every address; dispod checks the Host header against "
                           "the one address it listens on", hint="name one address, e.g. 127.0.0.1:8686")
    return TcpAddress(str(ip), port)


def bind_unix(path: Path) -> socket.socket:
    """The control socket, mode 0600. A stale socket (left by a dispod that died) is removed first; the caller
    holds dispod's lock, so it cannot belong to a live dispod."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise PermissionProblem(f"{path} exists and is not a socket", hint="remove it; dispod makes it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window in which another user could connect
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise PermissionProblem(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def bind_tcp(address: TcpAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as e:
        sock.close()
        raise InvalidInput(f"cannot listen on {address.netloc}: {e.strerror}",
                           hint="pick a free port (ss -ltn shows the used ones)") from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def unix_base(path: Path) -> str:
    """A URL base for a service reached only through its unix socket (the http+unix convention)."""
    return "http+unix://" + urllib.parse.quote(str(path), safe="")


class Server:
    """The app served on the given sockets until `close()`."""

    def __init__(self, app: web.Application, limits: Limits, *, unix: socket.socket | None,
                 tcp: socket.socket | None) -> None:
        self.app = app
        self.limits = limits
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        self._socks = [(ListenerKind.UNIX, unix), (ListenerKind.TCP, tcp)]
        self.listeners: dict[ListenerKind, Listener] = {}
        self._sites: list[GuardedSite] = []
        self.tcp: TcpAddress | None = None
        if tcp is not None:
            host, port = tcp.getsockname()[:2]
            self.tcp = TcpAddress(host, port)

    @property
    def base_url(self) -> str:
        """Where a browser reaches this server ("" without TCP)."""
        return f"http://{self.tcp.netloc}" if self.tcp is not None else ""

    async def start(self) -> None:
        await self._runner.setup()
        for kind, sock in self._socks:
            if sock is None:
                continue
            if kind is ListenerKind.TCP:
                assert self.tcp is not None
                listener = Listener(kind, self.limits, allowed_hosts(self.tcp.host, self.tcp.port))
                name = self.base_url
            else:
                listener = Listener(kind, self.limits)
                name = f"unix:{sock.getsockname()}"
            self.listeners[kind] = listener
            site = GuardedSite(self._runner, sock, listener, self.app[CONNECTIONS], name)
            await site.start()
            self._sites.append(site)

    async def stop_listening(self) -> None:
        """No new connections; the open ones (event streams) go on until `close()`."""
        for site in self._sites:
            await site.stop()
        self._sites.clear()

    async def close(self) -> None:
        await self.stop_listening()
        await self._runner.cleanup()
