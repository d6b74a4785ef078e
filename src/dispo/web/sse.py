"""GET /v1/events: the runtime's events as Server-Sent Events.

    event: state
    data: {"kind": "state", "session_id": "1a2b3c4d", "message": "running", "fields": {...}, "time": ...}

A stream first sends the current state of the sessions it covers (so a dashboard needs nothing else), then
every event as it happens. Sessions only move forward (starting, running, stopping, ended), so a `state`
event older than one already sent for its session is dropped: the snapshot and the live events never go
backwards. With ?session=ID the stream ends after that session's last event (`ended`, then its final
`state`); for a session that already ended it sends those two at once and ends. A comment line keeps idle
streams open through proxies. A client that does not keep up (its queue is full) is disconnected and
can reconnect; it gets a fresh snapshot.

Events come from session threads: the sink hops to the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from dispo.runtime.events import Event, EventKind, EventSink
from dispo.runtime.live import SessionState

KEEPALIVE_S = 15.0
QUEUE_MAX = 4096  # events waiting for one slow client; OUTPUT events are at most 64 KiB each
STATE_ORDER = {s.value: i for i, s in enumerate(SessionState)}
END = None  # put in a queue to end its stream (dispod is stopping)


def ended_events(status: Mapping[str, Any]) -> list[Event]:
    """The last two events of a session that already ended, from its status: what a late subscriber gets."""
    sid = str(status["id"])
    reason = str(status.get("end_reason") or "")
    error = status.get("error")
    ended = Event(EventKind.ENDED, sid, reason, {
        "exit_status": status.get("exit_status"), "end_reason": reason, "end_kind": status.get("end_kind"),
        "error": error,
        "console_tail": (error or {}).get("console_tail", "") if isinstance(error, dict) else ""})
    return [ended, Event(EventKind.STATE, sid, f"ended: {reason}", dict(status))]


def frame(event: Event) -> bytes:
    return f"event: {event.kind.value}\ndata: {json.dumps(event.to_json(), separators=(',', ':'))}\n\n".encode()


class Streams:
    """The open event streams, so dispod can end them when it stops."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Event | None]] = set()

    def add(self, q: asyncio.Queue[Event | None]) -> None:
        self._queues.add(q)

    def discard(self, q: asyncio.Queue[Event | None]) -> None:
        self._queues.discard(q)

    def close_all(self) -> None:
        for q in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(END)


class _Order:
    """Drops a `state` event that is not newer than what this stream already sent for its session."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}

    def fresh(self, event: Event) -> bool:
        if event.kind is not EventKind.STATE:
            return True
        rank = STATE_ORDER.get(str(event.fields.get("state", "")), -1)
        if rank <= self._sent.get(event.session_id, -1):
            return False
        self._sent[event.session_id] = rank
        return True


Subscribe = Callable[[EventSink], Callable[[], None]]


async def stream(request: web.Request, subscribe: Subscribe, snapshot: Callable[[], list[Event]], streams: Streams, *,
                 session: str | None = None, keepalive_s: float = KEEPALIVE_S) -> web.StreamResponse:
    """Answer with the event stream. `subscribe(sink) -> unsubscribe` is the runtime's Fanout; `snapshot()`
    is called after subscribing, so no event falls between the two."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=QUEUE_MAX)
    overflowed = False

    def put(event: Event) -> None:  # on the loop
        nonlocal overflowed
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:
            overflowed = True

    def sink(event: Event) -> None:  # on a session thread
        if session is not None and event.session_id != session:
            return
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens any more
                loop.call_soon_threadsafe(put, event)

    unsubscribe = subscribe(sink)
    streams.add(queue)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "X-Accel-Buffering": "no"})
    try:
        first = snapshot()
        await response.prepare(request)
        order = _Order()
        for snap in first:
            if order.fresh(snap):
                await response.write(frame(snap))
        # A session that had ended already: the snapshot was its last two events.
        finished = session is not None and any(e.kind is EventKind.ENDED for e in first)
        while not finished and not overflowed:
            try:
                event: Event | None = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is END:
                break
            if order.fresh(event):
                await response.write(frame(event))
            finished = (session is not None and event.kind is EventKind.STATE
                        and event.fields.get("state") == "ended")
    except ConnectionError:
        pass  # the client went away
    finally:
        unsubscribe()
        streams.discard(queue)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response
