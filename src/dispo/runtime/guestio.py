"""A running session's downloads, uploads, clipboard and sound, through its channel into the guest.

Each operation runs the guest's `dispo-files` (guest/files.sh) as the unprivileged user over the session's
SSH, after checking the request's policy (features.py) here: a direction the profile turned off is refused
before the guest is asked. The guest is hostile, so what it answers is parsed strictly: a listing is
"SIZE/NAME\\0" records (a bounded number of them), a name is used again only after `check_guest_name`, every
read is capped, and names meant for the host's file system go through `host_name`.

The CLI (`--downloads DIR`), the viewer and dispod's API all call these; none of them talks to the guest
itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispo import guest
from dispo.errors import Conflict, GuestIOError, InvalidInput, NotFound, Refused, TooLarge
from dispo.features import MIB
from dispo.proc import minimal_env

if TYPE_CHECKING:
    from dispo.runtime.live import LiveSession

PARTIAL_SUFFIXES = (".crdownload", ".part")  # Chromium's and Firefox's files of a download under way
MAX_LISTED = 1000
MAX_NAME_BYTES = 255
COMMAND_TIMEOUT_S = 30.0
CHUNK = 1 << 16


@dataclass(frozen=True)
class Download:
    name: str
    size: int
    complete: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "complete": self.complete}


def check_guest_name(name: str) -> str:
    """A file name as the guest may use it: one path component, no NUL, not . or .., at most 255 bytes."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name
            or len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES):
        raise InvalidInput(f"invalid file name {str(name)[:80]!r}",
                           hint="one file name: no '/', not '.' or '..', at most 255 bytes")
    return name


def host_name(name: str, fallback: str = "download") -> str:
    """A guest's file name made safe to create in a host directory: no path separator, no control or
    format character, no leading dot or dash, no trailing dot or space, at most 200 bytes, never empty."""
    out = []
    for ch in unicodedata.normalize("NFC", name):
        cat = unicodedata.category(ch)
        if ch in "/\\" or cat[0] == "C" or ch == "\ufffd":
            out.append("_")
        else:
            out.append(ch)
    text = "".join(out).strip().strip(". ")
    text = text.lstrip("-.")
    while len(text.encode()) > 200:
        text = text[:-1]
    return text or fallback


def parse_listing(raw: bytes) -> list[Download]:
    """`dispo-files list` output: "SIZE/NAME\\0" records. Anything malformed is skipped, not trusted."""
    found: dict[str, int] = {}
    for record in raw.split(b"\0"):
        if len(found) >= MAX_LISTED:
            break
        digits, sep, raw_name = record.partition(b"/")
        if not sep or not digits.isdigit() or len(digits) > 15 or not raw_name or b"/" in raw_name:
            continue
        name = raw_name.decode(errors="surrogateescape")
        try:
            check_guest_name(name)
        except InvalidInput:
            continue
        found[name] = int(digits)
    downloads = []
    for name, size in sorted(found.items()):
        if name.endswith(PARTIAL_SUFFIXES):
            continue  # the file of a download under way: listed as its target, incomplete
        partial = any(name + suffix in found for suffix in PARTIAL_SUFFIXES)
        downloads.append(Download(name, size, not partial))
    for name, size in sorted(found.items()):
        for suffix in PARTIAL_SUFFIXES:
            target = name[: -len(suffix)] if name.endswith(suffix) else ""
            if target and target not in found:
                downloads.append(Download(target, size, False))
    return downloads


class GuestIO:
    """The operations on one running session (its channel is there once the guest answered)."""

    def __init__(self, live: LiveSession) -> None:
        self.live = live
        self._uploads = threading.Semaphore(2)  # a few uploads at a time; each holds an SSH connection

    # -- plumbing ---------------------------------------------------------------------------------
    def _ending(self) -> bool:
        """Asked to end (DELETE, a timeout), or its app ended: its guest is going away."""
        return self.live.ended or self.live.cancel.is_set() or self.live.state in ("stopping", "ended")

    def _gone(self) -> Conflict:
        return Conflict(f"session {self.live.id} is ending: its guest takes no more requests",
                        hint="start a new session")

    def _argv(self, *args: str) -> list[str]:
        channel = self.live.channel
        # The session exists and its state does not allow this: 409 (a 404 would say there is no session).
        if self._ending():
            raise self._gone()
        if channel is None:
            raise Conflict(f"session {self.live.id} has no running guest yet", hint="wait until the session is ready")
        return channel.command([guest.FILES_PATH, *args])

    def _run(self, *args: str, data: bytes = b"", cap: int = MIB, timeout: float = COMMAND_TIMEOUT_S) -> bytes:
        argv = self._argv(*args)
        try:
            proc = subprocess.run(argv, input=data, capture_output=True, env=minimal_env(), timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            if self._ending():
                raise self._gone() from None
            raise GuestIOError(f"session {self.live.id}: the guest did not answer 'dispo-files {args[0]}' within "
                               f"{timeout:g} s") from None
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            reason = "".join(c if c.isprintable() else "?" for c in (detail[-1] if detail else ""))[:200]
            if proc.returncode == 3:
                raise NotFound(f"session {self.live.id}: no such file in the guest")
            if self._ending():  # it went away while it was asked: not the guest's failure
                raise self._gone()
            raise GuestIOError(f"session {self.live.id}: 'dispo-files {args[0]}' failed in the guest "
                               f"(status {proc.returncode}{': ' + reason if reason else ''})",
                               hint="the image may predate this dispo: rebuild it ('dispo image build NAME --force')")
        if len(proc.stdout) > cap:
            raise TooLarge(f"session {self.live.id}: the guest's answer is bigger than {cap} bytes")
        return proc.stdout

    def _policy(self) -> Any:
        self.live.touch()
        return self.live.request.features

    # -- downloads --------------------------------------------------------------------------------
    def downloads(self) -> list[Download]:
        if not self._policy().downloads:
            raise Refused(f"session {self.live.id}: downloads are turned off by its profile",
                          hint="set [downloads] enabled = true in the profile")
        return parse_listing(self._run("list", cap=MAX_LISTED * (MAX_NAME_BYTES + 20)))

    def download(self, name: str) -> Download:
        """One listed download, complete and within the cap (else NotFound, Refused or TooLarge)."""
        try:
            check_guest_name(name)
        except InvalidInput:
            if not name or name in (".", "..") or "/" in name or "\0" in name:
                raise
            # Only longer than 255 bytes: a file name, but none the guest can have (the API's schema counts
            # characters, not bytes).
            raise NotFound(f"session {self.live.id} has no download named {name[:80]!r}",
                           hint=f"list them: GET /v1/sessions/{self.live.id}/downloads") from None
        for d in self.downloads():
            if d.name == name:
                if not d.complete:
                    raise NotFound(f"session {self.live.id}: download {name!r} is not complete yet",
                                   hint="list the downloads again once it is complete")
                cap = self._policy().downloads_max_mib * MIB
                if d.size > cap:
                    raise TooLarge(f"download {name!r} has {d.size} bytes, more than the profile's "
                                   f"[downloads] max_mib ({cap // MIB} MiB)")
                return d
        raise NotFound(f"session {self.live.id} has no download named {name[:80]!r}",
                       hint=f"list them: GET /v1/sessions/{self.live.id}/downloads")

    @contextlib.contextmanager
    def open_download(self, d: Download) -> Iterator[Iterator[bytes]]:
        """The bytes of a (checked) download, in chunks; never more than its listed size (a guest that
        grows the file meanwhile is cut off), and an error if fewer arrive."""
        proc = subprocess.Popen(self._argv("get", d.name), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=minimal_env())

        def chunks() -> Iterator[bytes]:
            assert proc.stdout is not None
            left = d.size
            while left > 0:
                data = os.read(proc.stdout.fileno(), min(CHUNK, left))
                if not data:
                    raise GuestIOError(f"session {self.live.id}: download {d.name!r} ended {left} bytes short "
                                       f"(changed in the guest meanwhile?)")
                left -= len(data)
                yield data

        try:
            yield chunks()
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    # -- uploads ----------------------------------------------------------------------------------
    def upload(self, name: str, data: bytes) -> str:
        """`data` into the guest's ~/Uploads under `name` (made safe); the name the file got there."""
        policy = self._policy()
        if not policy.uploads:
            raise Refused(f"session {self.live.id}: uploads are turned off by its profile",
                          hint="set [uploads] enabled = true in the profile")
        if len(data) > policy.uploads_max_mib * MIB:
            raise TooLarge(f"the upload has {len(data)} bytes, more than the profile's [uploads] max_mib "
                           f"({policy.uploads_max_mib} MiB)")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES:  # as openapi.UPLOAD_NAME says
            raise InvalidInput(f"an upload needs a file name of 1 to {MAX_NAME_BYTES} characters",
                               hint="POST the file's bytes as the body, with ?name=FILENAME")
        safe = host_name(name, "upload")  # a dropped file's name, made one harmless file name
        with self._uploads:
            got = self._run("put", safe, data=data, cap=4 * MAX_NAME_BYTES, timeout=max(COMMAND_TIMEOUT_S,
                                                                                        len(data) / MIB))
        return got.decode(errors="replace")

    # -- clipboard --------------------------------------------------------------------------------
    def clipboard(self) -> str:
        policy = self._policy()
        if not policy.clipboard_from_guest:
            raise Refused(f"session {self.live.id}: its profile keeps the guest's clipboard in the guest",
                          hint="set [clipboard] from_guest = true in the profile")
        return self._run("clip-get", cap=policy.clipboard_max_bytes).decode(errors="replace")

    def set_clipboard(self, text: str) -> None:
        policy = self._policy()
        if not policy.clipboard_to_guest:
            raise Refused(f"session {self.live.id}: its profile does not let the clipboard into the guest",
                          hint="set [clipboard] to_guest = true in the profile")
        data = text.encode()
        if len(data) > policy.clipboard_max_bytes:
            raise TooLarge(f"the clipboard text has {len(data)} bytes, more than the profile's [clipboard] "
                           f"max_bytes ({policy.clipboard_max_bytes})")
        self._run("clip-set", data=data, cap=0)

    # -- sound ------------------------------------------------------------------------------------
    def sound_argv(self) -> list[str]:
        """The host argv whose stdout is the guest's sound (s16le, 48 kHz, stereo) while it runs."""
        if not self._policy().audio:
            raise Refused(f"session {self.live.id} has no sound: its profile says audio = false",
                          hint="set audio = true in the profile")
        return self._argv("sound")


SOUND_RATE = 48000
SOUND_CHANNELS = 2
