"""dispod's life: one per state dir (a flock), reclaim what a previous owner left, serve, stop cleanly.

Re-adopt or reclaim: sessions a previous dispod left (it was killed, or the host lost power) are TORN DOWN at
start, not re-adopted. Their VMM and app processes were children of the dead dispod, their app output had
nowhere to go, and their viewers' tokens died with it: re-adopting would mean a session nobody can see or
reach reliably. `Runtime.reclaim()` (the work of `dispo gc`) takes each dead journal's free lock and undoes
what it recorded; GET /v1/sessions/ID of such a session then answers state "ended" with end_reason
"reclaimed: its owner (a previous dispod) died". Journals still locked by a live owner (a `dispo run` in
another terminal) are left alone.

Nothing here prints: what people should see goes to the `say` callback (main.py prints it).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispo.config import Config, pool_targets
from dispo.errors import Conflict, InvalidInput, PermissionProblem
from dispo.infra import journal
from dispo.infra.private import kept_token, write_private
from dispo.runtime import Runtime
from dispo.runtime.events import EndKind, Event, EventKind
from dispo.runtime.machinery import REAL, Machinery
from dispo.runtime.pool import Pool
from dispo.servicepaths import OWNER, ServicePaths
from dispo.web.app import build_app
from dispo.web.automation import ServiceAutomation
from dispo.web.guard import Limits
from dispo.web.server import Server, TcpAddress, bind_tcp, bind_unix, parse_listen, unix_base
from dispo.web.service import RECLAIMED_BY_DISPOD, Service, reclaimed_status
from dispo.web.viewers import ServiceViewers

log = logging.getLogger(__name__)

STOP_REASON = "dispod stopping"
Say = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    listen: str = ""                      # "HOST:PORT", "" = the unix socket alone
    max_sessions: int = 4
    limits: Limits = field(default_factory=Limits)
    machinery: Machinery = REAL
    shutdown_timeout_s: float = 120.0     # for every session's teardown together, at stop
    new_token: bool = False               # rotate: a new access token, the one in dispod.token stops working
    ray: str = ""                         # a Ray head's address: also join that cluster as a node (dispo/cluster/)
    node: str = ""                        # this node's name in the cluster ([cluster] node, else the host name)
    cluster_secret: str = ""              # with ray: what the gateway's requests carry (dispo/cluster/secret.py)


def options_from(cfg: Config, *, listen: str | None = None, max_sessions: int | None = None,
                 machinery: Machinery = REAL, new_token: bool = False) -> Options:
    """The config's [service] table, overridden by command-line values; every value checked."""
    s = cfg.service
    values = {"max_sessions": max_sessions if max_sessions is not None else s.max_sessions,
              "max_connections": s.max_connections, "header_timeout_s": s.header_timeout_s}
    for key, value in values.items():
        if not 1 <= value <= 100_000:
            raise InvalidInput(f"service.{key} is {value}: give a whole number from 1 to 100000",
                               hint=f"fix [service] in {cfg.source} or the command line")
    return Options(listen=s.listen if listen is None else listen, max_sessions=values["max_sessions"],
                   limits=Limits(max_connections=values["max_connections"],
                                 header_timeout_s=float(values["header_timeout_s"])),
                   machinery=machinery, new_token=new_token)


def gateway_token(paths: ServicePaths, *, new: bool, say: Say) -> str:
    """A cluster gateway's access token, kept like dispod's own (Dispod._token)."""
    if not new:
        token, why = kept_token(paths.token)
        if token is not None:
            return token
        if why:
            say(f"warning: not using {paths.token}: {why}; it is replaced with a new token")
    token = secrets.token_urlsafe(32)
    write_private(paths.token, token + "\n")
    return token


class Dispod:
    def __init__(self, cfg: Config, options: Options, say: Say | None = None) -> None:
        self.cfg = cfg
        self.options = options
        self.paths = ServicePaths(cfg.state_dir)
        self.say: Say = say or (lambda _line: None)
        self.tcp: TcpAddress | None = parse_listen(options.listen) if options.listen else None
        self.token = ""  # open() keeps the one in dispod.token, or makes one
        self.viewers = ServiceViewers(frame_ancestors=cfg.service.frame_ancestors)
        self.automation = ServiceAutomation(self.viewers)
        self.rt = Runtime(cfg, machinery=options.machinery, viewers=self.viewers, automation=self.automation,
                          max_sessions=options.max_sessions, owner=OWNER)
        self.service: Service | None = None
        self.server: Server | None = None
        self.dashboard_url = ""
        self._lock_fd: int | None = None

    # -- start --------------------------------------------------------------------------------------
    def open(self) -> None:
        """Take the state dir (one dispod each) and reclaim what dead owners left. Raises a DispoError."""
        try:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise PermissionProblem(f"cannot create the state dir {self.cfg.state_dir}: {e.strerror}") from None
        self._lock()
        self.token = self._token()
        reclaimed = self._reclaim()
        # The warm pool starts once what dead owners left is gone (its guests are sessions like any other).
        svc = self.cfg.service
        self.rt.pool = Pool(self.rt, budget_mib=svc.pool_memory_mib or None, targets=pool_targets(svc.pool))
        self.service = Service(self.cfg, self.rt, token=self.token, viewers=self.viewers, reclaimed=reclaimed,
                               automation=self.automation)
        self.rt.events.subscribe(self._report)

    def _lock(self) -> None:
        try:
            fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise PermissionProblem(f"cannot open {self.paths.lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Conflict(f"another dispod (pid {holder}) already serves the state dir {self.cfg.state_dir}",
                           hint="stop it first ('systemctl stop dispod'), or give this one another state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _token(self) -> str:
        """The access token: kept across restarts in dispod.token (so open dashboards and clients reconnect by
        themselves), new with --new-token, or when the file is missing or cannot be trusted (then replaced)."""
        if not self.options.new_token:
            token, why = kept_token(self.paths.token)
            if token is not None:
                return token
            if why:
                self.say(f"warning: not using {self.paths.token}: {why}; it is replaced with a new token")
        token = secrets.token_urlsafe(32)
        try:
            write_private(self.paths.token, token + "\n")
        except OSError as e:  # a directory in its place, say
            raise PermissionProblem(f"cannot write the token file {self.paths.token}: {e.strerror}",
                                    hint="remove what is there (not made by dispod) and start dispod again") from None
        if self.options.new_token:
            self.say("made a new access token: links and clients with the old one get 401")
        return token

    def _reclaim(self) -> dict[str, dict[str, Any]]:
        dead = {info.session_id: info.meta for info in journal.scan(self.cfg.state_dir) if not info.alive}
        report = self.rt.reclaim()
        records: dict[str, dict[str, Any]] = {}
        for sid in report.reclaimed:
            meta = dead.get(sid, {})
            owner = meta.get("owner")
            why = RECLAIMED_BY_DISPOD if owner == OWNER else f"reclaimed: its owner ({owner or 'unknown'}) died"
            records[sid] = reclaimed_status(sid, meta, why)
            self.say(f"reclaimed session {sid} ({owner or 'unknown owner'} died): torn down")
        if report.undone:
            self.say(f"undid {len(report.undone)} object(s) left behind: " + "; ".join(report.undone))
        if report.orphans:
            self.say(f"removed {len(report.orphans)} orphan(s): " + "; ".join(report.orphans))
        for err in report.failed:
            self.say(f"warning: could not reclaim everything: {err.one_line()}")
        return records

    def _report(self, event: Event) -> None:
        """Session starts and ends, for dispod's log (journalctl -u dispod)."""
        if event.kind is EventKind.STATE and event.fields.get("state") == "starting":
            what = event.fields.get("profile") or event.fields.get("image")
            self.say(f"session {event.session_id} starting ({what})")
        elif event.kind is EventKind.ENDED:
            status = event.fields.get("exit_status")
            self.say(f"session {event.session_id} ended: {event.message}"
                     + (f" (exit status {status})" if status is not None else ""))

    # -- serve --------------------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> list[str]:
        """Listen and serve until `stop` is set, then end every session; the sessions whose teardown did not
        finish in time (their journals stay for the next start or `dispo gc`)."""
        assert self.service is not None, "open() first"
        loop = asyncio.get_running_loop()
        unix = bind_unix(self.paths.socket)
        try:
            tcp = bind_tcp(self.tcp) if self.tcp is not None else None
        except BaseException:
            unix.close()
            self.paths.socket.unlink(missing_ok=True)
            raise
        server = self.server = Server(build_app(self.service, self.options.limits, self.options.cluster_secret),
                                      self.options.limits, unix=unix, tcp=tcp)
        base = server.base_url or unix_base(self.paths.socket)
        self.viewers.bind(loop, base)
        self.automation.bind(loop)
        self.dashboard_url = f"{base}/ui/{self.token}/"
        member: Any = None
        try:
            await server.start()
            write_private(self.paths.url, self.dashboard_url + "\n")
            where = f"unix:{self.paths.socket}" + (f" and {server.base_url}" if server.base_url else "")
            most = self.options.max_sessions
            self.say(f"listening on {where} (max {most} session{'s' if most != 1 else ''}, "
                     f"machinery {self.options.machinery.name})")
            if server.base_url:
                self.say(f"dashboard: {self.dashboard_url}")
            else:
                self.say("dashboard and viewers need TCP: start dispod with --listen 127.0.0.1:PORT "
                         "(or [service] listen in the config)")
            if self.options.ray:  # late: a single host never imports the cluster's code (nor Ray)
                from dispo.cluster.node import NodeMember

                member = NodeMember(self.options.ray, self.options.node, server.base_url, self.cfg.state_dir,
                                    self.cfg.workspace, say=self.say)
                member.start()
            await stop.wait()
            live = self.rt.sessions()
            self.say(f"stopping: ending {len(live)} session(s)")
            self.service.stopping = True  # open keep-alive connections may still ask: they get 503 now
            await server.stop_listening()
            left = await loop.run_in_executor(None, self.rt.shutdown, STOP_REASON, self.options.shutdown_timeout_s,
                                              EndKind.DISPOD_STOPPED)
            # A POST that passed the check just before it may have started one more: end it too.
            left += await loop.run_in_executor(None, self.rt.shutdown, STOP_REASON, 30.0,
                                               EndKind.DISPOD_STOPPED)
            for s in left:
                self.say(f"warning: session {s.id} did not finish its teardown; 'dispo gc' or the next dispod "
                         "removes what it left")
            return [s.id for s in left]
        finally:
            if member is not None:
                await loop.run_in_executor(None, member.stop)
            self.service.close()
            await server.close()
            for path in (self.paths.socket, self.paths.url):  # the token stays: the next dispod keeps it
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
