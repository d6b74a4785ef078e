"""`dispo run`, `dispo ssh ID`, `dispo stop ID`: boot a disposable guest, get into it, end it.

`dispo run` builds a SessionRequest from its flags (every check before anything exists) and then either
hands it to dispod, when dispod's socket answers, or runs it in this process with the same runtime. Both
paths print the same lines from the same events (`Printer`) and exit with the same status. An interactive
shell and `--display x11` always run in-process: they need this terminal or this $DISPLAY.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from dispo import errors, ssh
from dispo.cli.common import Terminated, add_setting_option, command, dispod_client, escape_terminal, setting_flag
from dispo.cli.viewerlink import ViewerLink
from dispo.config import Config
from dispo.errors import DispoError, InvalidInput, JournalError, NotFound, VmmError
from dispo.features import MIB, Features
from dispo.infra import journal
from dispo.infra.proc import minimal_env
from dispo.names import check_session_id
from dispo.net.capture import describe as describe_request
from dispo.profiles import DisplayMode
from dispo.runtime import EndKind, Event, EventKind, Runtime, SessionRequest, Stdio, build
from dispo.runtime.live import LiveSession
from dispo.runtime.request import API_WHERE
from dispo.runtime.saver import DownloadSaver, Lister, Opener, open_directory
from dispo.servicepaths import OWNER as DISPOD_OWNER
from dispo.settings import SETTINGS

STOP_TIMEOUT_S = 60.0


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run an app profile (dispo run chromium [URL]) or CMD in a disposable guest, then throw it "
                    "all away",
        usage="dispo run [OPTIONS] PROFILE [URL] [OPTIONS]\n       dispo run [OPTIONS] [-- CMD [ARG ...]]",
        description="With PROFILE (chromium, firefox, or your own in /etc/dispo/profiles/NAME.toml): boot the "
                    "profile's image and run its app on the display it asks for (--display web: a viewer URL "
                    "on 127.0.0.1; x11: the host's $DISPLAY), opening URL or its start page; closing the app "
                    "ends the session. With -- CMD, or nothing: boot IMAGE, run CMD as the unprivileged user "
                    "(an interactive shell without CMD) and exit with its status. Either way, the guest runs "
                    "on a private copy-on-write disk and its own tap behind NAT, and everything is removed at "
                    "the end. When dispod runs, the session is its (same output, same exit status).")
    _add_run_options(run, argparse.SUPPRESS)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="PROFILE [URL], or -- CMD [ARG ...]")
    run.set_defaults(func=cmd_run)

    sh = sub.add_parser("ssh", help="open a shell (or run CMD) in a live session's guest")
    sh.add_argument("id", help="session id (see 'dispo ls')")
    sh.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    sh.set_defaults(func=cmd_ssh)

    stop = sub.add_parser("stop", help="end a live session: its owner powers the guest off and removes everything")
    stop.add_argument("ids", nargs="+", metavar="ID")
    stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S, help="seconds to wait for the teardown")
    stop.set_defaults(func=cmd_stop)


def _add_run_options(p: argparse.ArgumentParser, default: Any) -> None:
    """The options of `dispo run`, given before PROFILE or after it (argparse's REMAINDER takes all that
    follows the first word, so the words after PROFILE are parsed again with these)."""
    for key in SETTINGS:
        add_setting_option(p, key, default)
    p.add_argument("--name", default=default, help="a name for the session (shown by 'dispo ls')")
    p.add_argument("--display", choices=[m.value for m in DisplayMode], default=default,
                   help="with PROFILE: where the app shows (default: the profile's)")
    p.add_argument("--open", action="store_true", default=default,
                   help="with --display web: open the viewer URL in the desktop's browser")
    p.add_argument("--cold", dest="start", action="store_const", const="cold", default=default,
                   help="boot, even when a template could be restored")
    p.add_argument("--warm", dest="start", action="store_const", const="warm", default=default,
                   help="restore from a template, or fail saying why not")
    p.add_argument("--log-requests", action="store_true", default=default,
                   help="record every connection and DNS query the guest makes (seen on the host side of its "
                        "network) and list them when the session ends")
    p.add_argument("--automation", action="store_true", default=default,
                   help="with a browser profile: let programs drive it (Playwright, Puppeteer); dispod prints its "
                        "cdp_url (or bidi_url for Firefox)")
    p.add_argument("--record", action="store_true", default=default,
                   help="with a web display: record it to a video kept in the workspace ('dispo recording ls|rm'), "
                        "its sha256 in the disposal receipt")
    p.add_argument("--downloads", type=Path, default=default, metavar="DIR",
                   help="copy each finished download of the session's browser into DIR (an existing directory)")
    p.add_argument("--keep", default=default, metavar="NAME",
                   help="keep the app's profile (bookmarks, logins) on the volume NAME, made on first use; the next "
                        "session with --keep NAME finds it ('dispo volume ls|rm')")
    p.add_argument("--in-process", action="store_true", default=default,
                   help="run the session in this process even when dispod runs")


PROFILE_USAGE = "dispo run PROFILE [URL] [--display web|x11|none] [--open]"
# Each option's argparse dest and the request key it gives.
_FLAGS = {**{setting_flag(k).replace("-", "_"): k for k in SETTINGS},
          **{k: k for k in ("name", "display", "start", "log_requests", "keep", "automation", "record")}}


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (their defaults are SUPPRESSed: absent when not given)."""
    return {k: v for k, v in vars(args).items() if k in _FLAGS or k in ("open", "in_process", "downloads")}


def _profile_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, str | None]:
    """Options given anywhere, the profile's name and the URL, from `dispo run [OPTS] PROFILE [URL] [OPTS]`."""
    given = _given(args)
    rest = argparse.ArgumentParser(prog="dispo run", add_help=False, exit_on_error=False)
    _add_run_options(rest, argparse.SUPPRESS)
    try:
        later, words = rest.parse_known_args(args.cmd[1:])
    except argparse.ArgumentError as e:
        raise InvalidInput(f"dispo run {args.cmd[0]}: {e}", hint=PROFILE_USAGE) from None
    given.update(vars(later))
    for w in words:
        if w.startswith("-") and w != "-":
            raise InvalidInput(f"dispo run {args.cmd[0]}: unknown option {w!r}", hint=PROFILE_USAGE)
    if len(words) > 1:
        raise InvalidInput(f"dispo run {args.cmd[0]}: one URL at most, got {len(words)} words ({' '.join(words)})",
                           hint=f"{PROFILE_USAGE}; to run a command use 'dispo run --image NAME -- CMD'")
    return given, args.cmd[0], (words[0] if words else None)


def _request(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request as the API's body, unchecked, and the CLI-only options: it is checked once, where the
    session is made (dispod, or `build` in this process)."""
    body: dict[str, Any] = {}
    if args.cmd and args.cmd[0] != "--":
        given, profile, url = _profile_args(args)
        body["profile"] = profile
        if url:
            body["url"] = url
        cmd: list[str] = []
    else:
        given = _given(args)
        if given.get("open"):
            raise InvalidInput("--open goes with a profile", hint=PROFILE_USAGE)
        cmd = command(args.cmd, "dispo run [--image NAME] -- CMD [ARG ...]")
        if cmd:
            body["command"] = cmd
    for flag, key in _FLAGS.items():
        if given.get(flag) is not None:
            body[key] = given[flag]
    if given.get("downloads") is not None and "profile" not in body:
        raise InvalidInput("--downloads goes with a browser profile", hint="dispo run chromium URL --downloads DIR")
    tty = not cmd and "profile" not in body and sys.stdin.isatty()
    return body, {"open": bool(given.get("open")), "in_process": bool(given.get("in_process")),
                  "downloads": given.get("downloads"), "tty": tty}


def _build(cfg: Config, body: dict[str, Any], cli: dict[str, Any]) -> SessionRequest:
    """The request checked here, for a session in this process."""
    values = {k: v for k, v in body.items() if k != "command"}
    req = build(cfg, command=body.get("command", []), stdio=Stdio.TERMINAL, tty=cli["tty"], **values)
    if cli["downloads"] is not None:
        _check_downloads(req.profile, req.features, req.display)
    return req


def _check_downloads(profile: str, features: Features, display: DisplayMode) -> None:
    if not features.downloads:
        raise InvalidInput(f"--downloads: the profile {profile or '(none)'} turns downloads off",
                           hint="set [downloads] enabled = true in the profile")
    if display is DisplayMode.NONE:
        raise InvalidInput("--downloads goes with a browser profile", hint="dispo run chromium URL --downloads DIR")


class Printer:
    """Turns a session's events into the CLI's lines; the same for an in-process session and dispod's."""

    def __init__(self, *, link: ViewerLink | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.link = link  # --open: the viewer goes to the desktop's browser through this redirect file
        self.out, self.err = out, err
        self.t0 = time.monotonic()
        self._shown: set[str] = set()  # viewer URLs already printed (and opened)

    def __call__(self, e: Event) -> None:
        sid = e.session_id
        if e.kind is EventKind.READY:
            self._say(f"session {sid} {e.message}; 'dispo ssh {sid}' for another shell")
        elif e.kind is EventKind.NOTICE:
            self._say(e.message)
        elif e.kind is EventKind.VIEWER:
            url = str(e.fields.get("url", ""))
            if url in self._shown:
                self._say(f"session {sid}: the display is up")
            else:
                self.viewer(sid, url)
        elif e.kind is EventKind.OUTPUT:
            stream = self.out if e.fields.get("stream") == "stdout" else self.err
            data = base64.b64decode(str(e.fields.get("data", "")))
            stream.flush()
            if stream.isatty():  # the guest's bytes must not drive the user's terminal (escape sequences)
                stream.write(escape_terminal(data.decode(errors="replace")))
                stream.flush()
            else:
                stream.buffer.write(data)
                stream.buffer.flush()
        elif e.kind is EventKind.ENDED and e.fields.get("receipt"):
            self._requests(sid, e.fields.get("requests"))
            r = e.fields["receipt"]
            if r.get("clean"):
                image = {True: ", image unchanged", False: ", IMAGE CHANGED", None: ""}[r.get("image_unchanged")]
                n = r.get("checked")
                self._say(f"session {sid}: disposal receipt clean: {n} host object{'s' if n != 1 else ''} checked "
                          f"gone{image} ('dispo receipt {sid}')")
            for what in r.get("kept") or []:
                self._say(f"session {sid}: kept {what}")
        elif e.kind is EventKind.STATE and e.fields.get("state") == "stopping":
            self._say(f"session {sid}: {e.fields.get('end_reason') or 'stopping'} after "
                      f"{time.monotonic() - self.t0:.1f} s; tearing down")

    def viewer(self, sid: str, url: str) -> None:
        """The viewer's URL, once: given as soon as the session has one (its page shows the progress until the
        display is up), and again by the `viewer` event only if it was not."""
        if url in self._shown:
            return
        self._shown.add(url)
        self._say(f"session {sid}: viewer at {url}")
        print(url, file=self.out, flush=True)
        if self.link is not None and not self.link.open(url):
            self._say("no browser to open the viewer with; open the URL above")

    def notice(self, text: str) -> None:
        self._say(text)

    def _requests(self, sid: str, found: Any) -> None:
        """The list of --log-requests (names come from the guest: escaped before the terminal sees them)."""
        if not isinstance(found, list):
            return
        total = sum(int(r.get("count", 1)) for r in found if isinstance(r, dict))
        self._say(f"session {sid}: the guest made {total} request(s)" + (":" if found else ""))
        for r in found:
            if isinstance(r, dict):
                print(f"  {escape_terminal(describe_request(r))}", file=self.err, flush=True)

    def _say(self, text: str) -> None:
        print(f"dispo: {text}", file=self.err, flush=True)


def show_console(text: str, path: Path | None = None) -> None:
    from dispo.vmm.base import tail

    text = text or (tail(path) if path else "")
    if text:
        print("dispo: guest console (last lines):", file=sys.stderr)
        for line in text.splitlines():
            print(f"  | {escape_terminal(line)}", file=sys.stderr)
        sys.stderr.flush()


def exit_code(exit_status: int | None, error: DispoError | None) -> int:
    """A finished session's exit code for the shell; its error (with the console's last lines) is raised."""
    if error is not None:
        show_console(getattr(error, "console_tail", ""))
        raise error
    return exit_status if exit_status is not None else 0


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    body, cli = _request(args)
    with contextlib.ExitStack() as stack:
        # --open: the redirect file lives as long as the session (and this command) does.
        link = stack.enter_context(ViewerLink(cfg)) if cli["open"] else None
        return _run(cfg, body, cli, Printer(link=link))


def _run(cfg: Config, body: dict[str, Any], cli: dict[str, Any], printer: Printer) -> int:
    """Through dispod when it answers (it checks the request), else in this process (checked here). An
    interactive shell and an X11 display always run here: they need this terminal, this $DISPLAY."""
    client, notice = None, ""
    if not (cli["in_process"] or cli["tty"] or body.get("display") == DisplayMode.X11.value):
        client = dispod_client(cfg)
        display = _served_display(client, body) if client is not None else None
        if display == DisplayMode.X11.value:
            client = None
        elif client is not None and display == DisplayMode.WEB.value and not client.health().get("viewers"):
            notice = "dispod serves no viewers (it listens on its unix socket only): this session runs in-process"
            client = None
    if body.get("automation") and client is None:
        raise InvalidInput("--automation is served by dispod, and no dispod that listens on TCP answers"
                           + (" (or --in-process was given)" if cli["in_process"] else ""),
                           hint="start dispod with --listen 127.0.0.1:8686 (or [service] listen in the config)")
    req = _build(cfg, body, cli) if client is None else None
    if notice:  # once the request passed: bad input is one line
        printer.notice(notice)
    saving: tuple[Path, int] | None = None
    if cli["downloads"] is not None:
        saving = (cli["downloads"], open_directory(cli["downloads"]))  # checked before anything starts
    if req is None:
        return _run_via_dispod(client, body, printer, saving)
    return _run_in_process(cfg, req, printer, saving)


def _served_display(client: Any, body: dict[str, Any]) -> str | None:
    """Where the session would show its app, as dispod's profiles say (None: dispod will say what is wrong)."""
    if "display" in body or "profile" not in body:
        return str(body.get("display") or DisplayMode.NONE.value)
    for p in client.profiles():
        if p.get("name") == body["profile"]:
            return str(p["display"]) if p.get("display") else None
    return None


def _saver(saving: tuple[Path, int], lister: Lister, opener: Opener, policy: Features,
           printer: Printer) -> DownloadSaver:
    directory, fd = saving

    def saved(name: str, stored: str, size: int) -> None:
        printer.notice(f"download {escape_terminal(name)!r} ({size} bytes) copied to {directory / stored}")

    saver = DownloadSaver(directory, fd, lister=lister, opener=opener, max_bytes=policy.downloads_max_mib * MIB,
                          total_bytes=policy.downloads_total_mib * MIB, total_files=policy.downloads_total_files,
                          on_saved=saved, on_error=lambda text: printer.notice(escape_terminal(text)))
    saver.start()
    return saver


def wait_until_ended(live: LiveSession) -> None:
    """Until the session ended; a signal stops it, teardown still completes, then the signal goes on."""
    pending: BaseException | None = None
    while True:
        try:
            while not live.wait(0.5):
                pass
            break
        except KeyboardInterrupt as e:
            live.stop("interrupted (SIGINT)", EndKind.INTERRUPTED)
            pending = pending or e
        except Terminated as e:
            live.stop(f"stopped by {signal.Signals(e.signum).name}", EndKind.INTERRUPTED)
            pending = pending or e
    if pending is not None:
        raise pending


def _run_in_process(cfg: Config, req: SessionRequest, printer: Printer,
                    saving: tuple[Path, int] | None = None) -> int:
    from dispo.web.viewers import StandaloneViewers  # the web server's code, loaded only where a session runs

    viewers = StandaloneViewers()
    rt = Runtime(cfg, viewers=viewers, owner=f"dispo run (pid {os.getpid()})")
    try:
        live = rt.start(req, sink=printer)
    except BaseException:
        viewers.close()
        raise
    if live.viewer_url:  # served from the start: its page says what happens while the guest boots
        printer.viewer(live.id, live.viewer_url)
    saver = None
    if saving is not None:
        saver = _saver(saving, lambda: [d.to_json() for d in live.io.downloads()],
                       lambda name: live.io.open_download(live.io.download(name)),
                       req.features, printer)
    try:
        wait_until_ended(live)
    finally:
        if saver is not None:
            saver.stop()
        viewers.close()  # once an open viewer page was told how the session ended
    return exit_code(live.exit_status, live.error)


def _run_via_dispod(client: Any, body: dict[str, Any], printer: Printer,
                    saving: tuple[Path, int] | None = None) -> int:
    try:
        created = client.create_session(body)
    except InvalidInput as e:  # the user typed `dispo run`, not a POST: the same line as in-process
        raise type(e)(e.message.removeprefix(API_WHERE), hint=e.hint) from None
    sid = str(created["id"])
    saver = None
    if saving is not None:
        # The session's features as dispod made them: its JSON has the profile's tables (Features.to_json).
        policy = Features.from_profile(created["features"], where="dispod's answer")
        try:
            _check_downloads(str(created.get("profile") or ""), policy, DisplayMode(created["display"]))
        except InvalidInput:
            client.delete(sid, wait=True)  # its profile says what dispod's check could not: nothing stays
            raise
        saver = _saver(saving, lambda: client.downloads(sid), lambda name: client.download(sid, name),
                       policy, printer)
    try:
        return _follow(client, sid, created, printer)
    finally:
        if saver is not None:
            saver.stop()


def _follow(client: Any, sid: str, created: dict[str, Any], printer: Printer) -> int:
    if created.get("start_reason"):  # said before this client could follow the session's events
        printer.notice(str(created["start_reason"]))
    if created.get("viewer_url"):  # served from the start: its page says what happens while the guest boots
        printer.viewer(sid, str(created["viewer_url"]))
    for key, what in (("cdp_url", "CDP"), ("bidi_url", "WebDriver BiDi")):
        if created.get(key):  # a program connects once the session runs (the relay waits for the browser)
            printer.notice(f"session {sid}: automation ({what}) at {created[key]}")
            print(created[key], file=printer.out, flush=True)
    ended: dict[str, Any] = {}
    deleting = False
    pending: BaseException | None = None
    while not ended:
        try:
            for event in client.events(session=sid):
                printer(event)
                if event.kind is EventKind.ENDED:
                    ended = dict(event.fields)
                    break
            else:
                ended = client.session(sid)  # the stream closed early: ask once more
                if ended.get("state") != "ended":
                    ended = {}
                    time.sleep(0.2)
        except (KeyboardInterrupt, Terminated) as e:
            pending = pending or e
            if not deleting:
                deleting = True
                client.delete(sid)
    if pending is not None:
        raise pending
    err = ended.get("error")
    return exit_code(ended.get("exit_status"), errors.from_problem(err) if err else None)


def _live(cfg: Config, session_id: str) -> journal.JournalInfo:
    check_session_id(session_id)
    for info in journal.scan(cfg.state_dir):
        if info.session_id == session_id:
            if not info.alive:
                raise NotFound(f"session {session_id} is not running (its owner died)",
                               hint="'dispo gc' removes what it left behind")
            return info
    raise NotFound(f"no session {session_id}", hint="list live sessions with 'dispo ls'")


def cmd_ssh(args: argparse.Namespace, cfg: Config) -> int:
    cmd = command(args.cmd, "dispo ssh ID -- CMD [ARG ...]")
    info = _live(cfg, args.id)
    found = ssh.load_info(info.path)
    if found is None:
        raise VmmError(f"session {args.id} has no guest that answers on SSH (yet)",
                       hint="wait until 'dispo run' says the session is ready")
    keys, address = found
    ssh.wait_port(address, 30.0)  # ready by its agent: sshd may be a moment behind (ssh then says what it found)
    tty = not cmd and sys.stdin.isatty()
    argv = ssh.ssh_argv(keys, address, batch=not tty, tty=tty)
    if cmd:
        argv.append(ssh.remote_command(cmd))
    # Not proc.run(): the user's terminal and streams go straight through to the guest.
    return subprocess.run(argv, env=minimal_env(), check=False).returncode


def cmd_stop(args: argparse.Namespace, cfg: Config) -> int:
    infos = [_live(cfg, sid) for sid in args.ids]  # check every id before stopping any
    client = None
    for info in infos:
        if info.meta.get("owner") == DISPOD_OWNER:  # dispod's session: ask dispod, never signal it
            client = client or dispod_client(cfg)
            if client is None:
                raise errors.ServiceError(f"session {info.session_id} belongs to dispod, which does not answer")
            client.delete(info.session_id)
            continue
        pid = int(info.meta.get("owner_pid", 0))
        if pid <= 1:
            raise VmmError(f"session {info.session_id} does not say which process owns it")
        # The owner unwinds on SIGTERM (power off, then its journal); it holds the journal's lock until done.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for info in infos:
        deadline = time.monotonic() + args.timeout
        while info.path.exists() and time.monotonic() < deadline:
            if _owner_gone(info.path):
                break
            time.sleep(0.1)
        if info.path.exists():
            print(f"dispo: session {info.session_id}: owner gone but objects left; run 'dispo gc'", file=sys.stderr)
        else:
            print(f"stopped {info.session_id}")
    return 0


def _owner_gone(path: Path) -> bool:
    try:
        probe = journal.Journal.load(path)
    except JournalError:
        return not path.exists()
    if probe.try_lock():
        probe.release()  # the owner is gone; whatever it left is for 'dispo gc'
        return True
    return False
