"""HTTP for a session's downloads, uploads, clipboard and sound: the same handlers under dispod's API
(/v1/sessions/{id}/...) and under a viewer's token path (the viewer's Downloads panel, drag-and-drop, sound).

Every operation is runtime/guestio.py's (policy, caps, the guest's answers checked); this module only moves
bytes between HTTP and it, off the event loop. Errors are raised, and mapped once by guard.answer_problems.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

from aiohttp import WSMsgType, web

from dispo.errors import InvalidInput, TooLarge
from dispo.features import MIB
from dispo.runtime.guestio import GuestIO, host_name
from dispo.web.guard import holding, json_value
from dispo.web.offloop import blocking
from dispo.web.problems import HttpProblem

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0  # a viewer that takes no sound for this long ends its stream


async def list_downloads(io: GuestIO) -> web.Response:
    found = await blocking(io.downloads)
    return web.json_response({"downloads": [d.to_json() for d in found]})


async def get_download(io: GuestIO, name: str, request: web.Request) -> web.StreamResponse:
    d = await blocking(io.download, name)
    safe = host_name(d.name)
    ascii_name = safe.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream", "Content-Length": str(d.size),
        "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(safe, safe='')}",
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})
    with io.open_download(d) as chunks:
        first = await blocking(next, chunks, b"")  # a guest that fails at once still gets a proper error
        await response.prepare(request)
        data = first
        while data:
            await response.write(data)
            data = await blocking(next, chunks, b"")
    await response.write_eof()
    return response


class BodyClock:
    """The deadline of a request body that is read as it arrives: `timeout_s` from the start, plus a second
    for every `rate` bytes received, so a client that trickles (1 byte/s) is cut off and a fast one is not."""

    def __init__(self, timeout_s: float, rate: int) -> None:
        self.start = time.monotonic()
        self.timeout_s, self.rate = timeout_s, rate

    async def chunks(self, request: web.Request, limit: int) -> AsyncIterator[bytes]:
        """The body as it arrives; InvalidInput (413) past `limit` bytes, (408) past the deadline."""
        received = 0
        while True:
            left = self.start + self.timeout_s + received / self.rate - time.monotonic()
            try:
                chunk = await asyncio.wait_for(request.content.readany(), max(left, 0.0))
            except TimeoutError:
                raise HttpProblem(InvalidInput(
                    f"the request body came too slowly: {received} bytes in "
                    f"{time.monotonic() - self.start:.0f} s", hint="send the body at once, without pauses"),
                    408, {"Connection": "close"}) from None
            if not chunk:
                return
            received += len(chunk)
            if received > limit:
                raise TooLarge(f"the request body is bigger than {limit} bytes")
            yield chunk


async def post_upload(io: GuestIO, request: web.Request) -> web.Response:
    """The body goes into the guest as it arrives (a chunk at a time, never held whole), under BodyClock."""
    name = request.query.get("name", "")
    if not name:
        raise InvalidInput("an upload needs ?name=FILENAME", hint="POST the file's bytes as the body")
    size = request.content_length
    if size is None:
        raise HttpProblem(InvalidInput("an upload needs a Content-Length header",
                                       hint="POST the file's bytes as the body, not chunked"), 411)
    cap = io.live.request.features.uploads_max_mib * MIB
    if size > cap:
        raise TooLarge(f"the upload has {size} bytes, more than the profile's [uploads] max_mib ({cap // MIB} MiB)")
    clock = BodyClock(*io.body_limits())
    upload = await blocking(io.begin_upload, name, size)
    try:
        async for chunk in clock.chunks(request, size):
            await blocking(upload.write, chunk)
        stored = await blocking(upload.finish)
    finally:
        await blocking(upload.abort)
    return web.json_response({"name": stored, "size": size, "directory": "~/Uploads"}, status=201)


async def get_clipboard(io: GuestIO) -> web.Response:
    return web.json_response({"text": await blocking(io.clipboard)})


async def put_clipboard(io: GuestIO, request: web.Request) -> web.Response:
    cap = io.live.request.features.clipboard_max_bytes
    if request.content_type not in ("application/json", "text/plain"):
        raise InvalidInput("the clipboard takes text/plain or application/json", hint='{"text": "..."}')
    limit = cap + 64 * 1024  # room for JSON's quoting; the text itself is checked against cap below
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the clipboard text is bigger than the profile's [clipboard] max_bytes ({cap})")
    parts = [chunk async for chunk in BodyClock(*io.body_limits()).chunks(request, limit)]
    raw = b"".join(parts)
    if request.content_type == "application/json":
        try:
            body = json_value(raw)  # a depth cap: nested arrays under the size cap are still bad JSON
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"the body is not valid JSON: {e}", hint='{"text": "..."}') from None
        if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
            raise InvalidInput('the body must be {"text": "..."}', hint='{"text": "..."}, or text/plain')
        text = body["text"]
    else:
        text = raw.decode(errors="replace")
    await blocking(io.set_clipboard, text)
    return web.json_response({"text": text})


async def sound(io: GuestIO, request: web.Request) -> web.WebSocketResponse:
    """The guest's sound as binary WebSocket messages of raw s16le 48 kHz stereo, while the socket is open.

    The stream's own thread reads the guest (guestio.SoundStream, its process journaled in the session) and
    waits here for each message to be sent, so a viewer that reads slowly slows the guest's side down."""
    stream = await blocking(io.sound)  # Refused or NotFound: still an HTTP answer
    ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=4096)
    await ws.prepare(request)
    loop = asyncio.get_running_loop()

    def deliver(data: bytes) -> None:  # in the stream's thread
        asyncio.run_coroutine_threadsafe(ws.send_bytes(data), loop).result(SEND_TIMEOUT_S)

    def ended() -> None:  # in the stream's thread: the viewer learns that the sound is over
        with contextlib.suppress(RuntimeError):  # the loop is closed: dispod is going
            asyncio.run_coroutine_threadsafe(ws.close(), loop)

    try:
        async with holding(request, ws):  # revoking the viewer's link closes it
            if not ws.closed:
                await blocking(stream.start, deliver, ended)
            async for msg in ws:  # nothing is expected from the viewer; reading notices the close
                if msg.type is WSMsgType.ERROR:
                    break
                io.live.touch()
    finally:
        await blocking(stream.close)
    return ws


_ROUTES: dict[tuple[str, str], Callable[[GuestIO, web.Request], Awaitable[web.StreamResponse]]] = {
    ("GET", "downloads"): lambda io, request: list_downloads(io),
    ("POST", "uploads"): post_upload,
    ("GET", "clipboard"): lambda io, request: get_clipboard(io),
    ("PUT", "clipboard"): put_clipboard,
    ("GET", "sound"): sound,
    ("GET", "features"): lambda io, request: features(io),
}


async def features(io: GuestIO) -> web.Response:
    """What the session's profile allows (the viewer shows its buttons accordingly)."""
    return web.json_response(io.live.request.features.to_json())


def is_route(tail: str) -> bool:
    """`tail` is one of this module's paths (a view link is refused all of them)."""
    return tail.startswith("downloads/") or any(t == tail for _, t in _ROUTES)


async def dispatch(io: GuestIO, tail: str, request: web.Request) -> web.StreamResponse | None:
    """`tail` below a session's path (downloads, downloads/NAME, uploads, clipboard, sound), or None if it is
    none of them."""
    if tail.startswith("downloads/"):
        if request.method != "GET":
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        return await get_download(io, tail[len("downloads/"):], request)
    handler = _ROUTES.get((request.method, tail))
    if handler is not None:
        return await handler(io, request)
    allowed = [m for m, t in _ROUTES if t == tail]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    return None
