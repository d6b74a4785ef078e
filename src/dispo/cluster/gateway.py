"""`dispod --gateway --ray ADDRESS`: one address and one token for every node of a Ray cluster of dispods.

The gateway serves dispod's REST API (and its OpenAPI document) with no sessions of its own:

- `POST /v1/sessions` is placed: every node's agent (agent.py) said what it can take at the last poll; the
  gateway filters (free slots, the image present) and ranks (a warm guest or template for the profile, then
  most free slots, then most free memory), and asks the best node. A node may still refuse (429: its own
  admission decides, the gateway's view may be a poll old): then the next one, at most MAX_TRIES. None: 429.
- Session ids are global, NODE~ID (ids.py); everything about a session (status, DELETE, events, downloads,
  uploads, clipboard, tokens, takeover, recording, and its viewer and automation URLs, WebSockets included)
  is relayed to the node that holds it, with the cluster's secret as the bearer (never the user's token, which
  only the gateway checks). Answers come back with the node's ids and URLs made the gateway's.
- `GET /v1/sessions` and `GET /v1/events` merge every node's.

A lost node: the gateway polls every agent each POLL_S. A node whose agent has not answered for LOST_AFTER_S
(its dispod died: the agent dies with it, or cannot reach its socket; its raylet died; it is cut off) is lost:
its sessions, as its last answer listed them, are reported `ended` with end_reason "node lost" (end_kind
node_lost), and new sessions go elsewhere. So a session is reported lost at most LOST_AFTER_S + POLL_S +
ASK_TIMEOUT_S (17 s) after its node stopped answering. When the node's dispod starts again (it reclaims what
its sessions left, as after any kill -9) its agent reappears and the node takes sessions again.

State: only what the last poll said, and the lost sessions' records (in memory: a restarted gateway knows the
nodes again after one poll, but not the sessions of nodes lost before it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from dispo import __version__
from dispo.cluster import ids
from dispo.cluster.agent import AGENT_PREFIX, NAMESPACE
from dispo.errors import Busy, DispoError, InvalidInput, NotFound, PermissionProblem, ServiceError
from dispo.runtime.events import EndKind, Event
from dispo.settings import SETTINGS
from dispo.web import dashboard, sse
from dispo.web.api import _body, _flag
from dispo.web.guard import CONNECTIONS, MIDDLEWARES, TOKEN, Connections, Limits, authenticated, security_headers
from dispo.web.openapi import document

log = logging.getLogger(__name__)

POLL_S = 2.0
ASK_TIMEOUT_S = 5.0
LOST_AFTER_S = 10.0
MAX_TRIES = 3
NODE_LOST = "node lost"
RELAY_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
API_TIMEOUT = aiohttp.ClientTimeout(total=330)  # DELETE ?wait=1 waits up to 300 s on the node
HOP_HEADERS = ("Content-Type", "Content-Length", "Content-Disposition", "Digest", "Cache-Control", "Location",
               "Retry-After", "Content-Security-Policy", "X-Content-Type-Options")


@dataclass
class NodeView:
    name: str
    info: dict[str, Any]
    seen: float  # time.monotonic() of its last answer

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def netloc(self) -> str:
        return self.url.split("://", 1)[1].rstrip("/")


class RayView:
    """The Ray side, blocking (called in threads): the driver, and one poll of every node's agent."""

    def __init__(self, address: str) -> None:
        from dispo.cluster.node import import_ray, local_ip_towards

        ray = import_ray()
        # Its own address named, as a node's driver does: on a host with several raylets Ray might pick another.
        ray.init(address=address, namespace=NAMESPACE, _node_ip_address=local_ip_towards(address),
                 log_to_driver=False, configure_logging=False)

    def poll(self) -> dict[str, dict[str, Any]]:
        """What each agent that answered within ASK_TIMEOUT_S said, by node name."""
        import ray

        refs: dict[str, Any] = {}
        for name in ray.util.list_named_actors():
            if not name.startswith(AGENT_PREFIX):
                continue
            with contextlib.suppress(Exception):  # it died between the listing and now
                refs[name.removeprefix(AGENT_PREFIX)] = ray.get_actor(name, namespace=NAMESPACE).info.remote()
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ASK_TIMEOUT_S)
        answers: dict[str, dict[str, Any]] = {}
        for node, ref in refs.items():
            if ref in ready:
                with contextlib.suppress(Exception):  # the agent failed (its dispod's socket is gone)
                    answers[node] = ray.get(ref, timeout=0)
        return answers

    def close(self) -> None:
        import ray

        ray.shutdown()


def rewrite(value: Any, node: str, local: str, node_netloc: str, gw_netloc: str) -> Any:
    """A node's answer about its session `local`, in the gateway's words: the id global (in fields, URLs and
    messages alike), the node's URLs the gateway's."""
    gid = ids.global_id(node, local)
    if isinstance(value, dict):
        return {k: rewrite(v, node, local, node_netloc, gw_netloc) for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite(v, node, local, node_netloc, gw_netloc) for v in value]
    if isinstance(value, str) and (local in value or (node_netloc and node_netloc in value)):
        if node_netloc:
            value = value.replace(f"//{node_netloc}/", f"//{gw_netloc}/")
        # The id as a word of its own (a path segment, a message's "session 1a2b3c4d"), not inside a token.
        return re.sub(rf"(?<![\w~-]){re.escape(local)}(?![\w-])", gid, value)
    return value


def lost_status(node: str, status: dict[str, Any]) -> dict[str, Any]:
    return {**status, "state": "ended", "end_reason": NODE_LOST, "end_kind": EndKind.NODE_LOST.value,
            "viewer_url": None, "cdp_url": None, "bidi_url": None, "step": "",
            "error": {"type": "NodeLost", "message": f"node {node} was lost: its sessions ended with it",
                      "hint": "start a new session: the gateway places it on a node that is there",
                      "status": 503, "console_tail": ""}}


class Gateway:
    def __init__(self, ray_address: str, secret: str, say: Callable[[str], None],
                 view_factory: Callable[[str], Any] = RayView) -> None:
        self.ray_address = ray_address
        self.secret = secret
        self.say = say
        self.view_factory = view_factory
        self.ray: Any = None
        self.nodes: dict[str, NodeView] = {}
        self.lost: dict[str, dict[str, Any]] = {}  # global id -> its status, ended "node lost"
        self.lost_nodes: set[str] = set()
        self.netloc = ""  # the gateway's own host:port (set by serve)
        self.started = time.time()
        self.http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.polled = asyncio.Event()

    # -- the cluster's view -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=API_TIMEOUT, auto_decompress=False)
        self.ray = await asyncio.to_thread(self.view_factory, self.ray_address)
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.http is not None:
            await self.http.close()
        if self.ray is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.ray.close)

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as e:  # Ray's head away: keep the last view, nodes age out as lost
                log.warning("poll of the cluster failed: %s", e)
                self._age(time.monotonic())
            self.polled.set()
            await asyncio.sleep(POLL_S)

    async def poll_once(self) -> None:
        answers = await asyncio.to_thread(self.ray.poll)
        now = time.monotonic()
        for name, info in answers.items():
            if name not in self.nodes:
                self.say(f"node {name} joined ({info.get('url')}, {info.get('sessions')}/"
                         f"{info.get('max_sessions')} sessions)" + (" again" if name in self.lost_nodes else ""))
            self.lost_nodes.discard(name)
            self.nodes[name] = NodeView(name, info, now)
        self._age(now)

    def _age(self, now: float) -> None:
        for view in list(self.nodes.values()):
            if now - view.seen > LOST_AFTER_S:
                self._lose(view)

    def _lose(self, view: NodeView) -> None:
        del self.nodes[view.name]
        self.lost_nodes.add(view.name)
        ended = 0
        for status in view.info.get("statuses") or []:
            if status.get("state") == "ended":
                continue
            local = str(status["id"])
            gid = ids.global_id(view.name, local)
            self.lost[gid] = lost_status(view.name, rewrite(status, view.name, local, view.netloc, self.netloc))
            ended += 1
        self.say(f"node {view.name} lost (no answer for {LOST_AFTER_S:.0f} s): {ended} session(s) ended")

    def node(self, name: str, gid: str) -> NodeView:
        view = self.nodes.get(name)
        if view is None:
            if name in self.lost_nodes:
                raise NotFound(f"session {gid} was on node {name}, which was lost",
                               hint="start a new session: the gateway places it on a node that is there")
            raise NotFound(f"no node {name} in the cluster", hint="see 'dispo ls' for the sessions there are")
        return view

    # -- talking to a node ------------------------------------------------------------------------------
    def _headers(self, request: web.Request | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.secret}", "User-Agent": f"dispo-gateway/{__version__}"}
        if request is not None:
            for name in ("Content-Type", "Content-Length", "Accept", "Range"):
                if name in request.headers:
                    headers[name] = request.headers[name]
        return headers

    async def ask(self, view: NodeView, method: str, path: str, *, json_body: Any = None,
                  params: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, JSON answer) of one API call to a node."""
        assert self.http is not None
        try:
            async with self.http.request(method, view.url + path, json=json_body, params=params,
                                         headers=self._headers()) as r:
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise ServiceError(f"node {view.name} ({view.url}) did not answer {method} {path}: "
                               f"{e or type(e).__name__}", hint="the gateway reports it lost if it stays away"
                               ) from None

    # -- placement --------------------------------------------------------------------------------------
    def candidates(self, body: dict[str, Any]) -> tuple[list[NodeView], str]:
        """The nodes that can take `body`, best first, and (when none) why not, in one line."""
        profile = body.get("profile")
        image = body.get("image")
        views = list(self.nodes.values())
        if not views:
            return [], "no node is in the cluster (none answered the gateway)"

        def wanted(v: NodeView) -> str:
            if isinstance(image, str) and image:
                return image
            if isinstance(profile, str) and profile:
                return str((v.info.get("profiles") or {}).get(profile, {}).get("image") or "")
            return str(SETTINGS["image"].default)

        def holds(v: NodeView) -> bool:
            name = wanted(v)
            return any(i.get("name") == name for i in v.info.get("images") or [])

        with_image = [v for v in views if holds(v)]
        if not with_image:
            what = wanted(views[0]) or f"profile {profile}"
            return [], f"no node holds the image {what} (nodes: {', '.join(sorted(self.nodes))})"
        free = [v for v in with_image if int(v.info.get("free_slots") or 0) > 0]
        if not free:
            full = ", ".join(f"{v.name} {v.info.get('sessions')}/{v.info.get('max_sessions')}"
                             for v in sorted(with_image, key=lambda v: v.name))
            return [], f"every node is at its max_sessions ({full})"
        key = str(profile or image or "")

        def rank(v: NodeView) -> tuple[int, int, int, int]:
            warm = int((v.info.get("warm") or {}).get(key, 0))
            templates = v.info.get("templates") or []
            template = any(t in (f"profile-{key}", key) for t in templates)
            return (-warm, -int(template), -int(v.info.get("free_slots") or 0),
                    -int(v.info.get("mem_available_mib") or 0))

        return sorted(free, key=rank), ""

    async def create(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if not isinstance(body, dict):
            raise InvalidInput("POST /v1/sessions: the body must be a JSON object",
                               hint='e.g. {"image": "minimal", "command": ["sh", "-c", "echo hi"]}')
        views, why = self.candidates(body)
        if not views:  # the view may be a poll old (a session just ended): ask the nodes once more
            with contextlib.suppress(Exception):
                await self.poll_once()
            views, why = self.candidates(body)
        refused: list[str] = []
        for view in views[:MAX_TRIES]:
            status, answer = await self.ask(view, "POST", "/v1/sessions", json_body=body)
            if status == 429:  # its own admission said no (the poll was old): the next node
                refused.append(view.name)
                continue
            if status != 201 or not isinstance(answer, dict):
                return self.problem(view, answer, status)
            # Count it at once, so the next POST before the next poll does not pick a full node.
            view.info["free_slots"] = max(0, int(view.info.get("free_slots") or 0) - 1)
            view.info["sessions"] = int(view.info.get("sessions") or 0) + 1
            view.info.setdefault("statuses", []).append(answer)
            local = str(answer["id"])
            out = rewrite(answer, view.name, local, view.netloc, self.netloc)
            return web.json_response(out, status=201, headers={"Location": f"/v1/sessions/{out['id']}"})
        if refused:
            why = f"the nodes with room refused it ({', '.join(refused)} at their max_sessions)"
        raise Busy(f"no node can take this session: {why}",
                   hint="end a session or wait, add a node, or raise [service] max_sessions on the nodes")

    def problem(self, view: NodeView, answer: Any, status: int) -> web.Response:
        """A node's error answer, passed on as it is (its problem document names the error)."""
        return web.json_response(answer, status=status, content_type="application/problem+json")

    # -- lists ------------------------------------------------------------------------------------------
    async def each_node(self, path: str, params: dict[str, str] | None = None) -> list[tuple[NodeView, Any]]:
        views = list(self.nodes.values())

        async def one(v: NodeView) -> tuple[NodeView, Any] | None:
            try:
                status, answer = await self.ask(v, "GET", path, params=params)
            except ServiceError:
                return None
            return (v, answer) if status == 200 else None

        return [a for a in await asyncio.gather(*(one(v) for v in views)) if a is not None]

    async def list_sessions(self, request: web.Request) -> web.Response:
        every = _flag(request, "all")
        merged: list[dict[str, Any]] = []
        for view, answer in await self.each_node("/v1/sessions", {"all": "1"} if every else None):
            for s in answer.get("sessions") or []:
                merged.append(rewrite(s, view.name, str(s["id"]), view.netloc, self.netloc))
        if every:
            merged.extend(self.lost.values())
        return web.json_response({"sessions": merged})

    async def profiles(self) -> list[dict[str, Any]]:
        """Every node's profiles, one entry per name (a node that holds the profile's image first)."""
        found: dict[str, dict[str, Any]] = {}
        for _view, answer in await self.each_node("/v1/profiles"):
            for p in answer.get("profiles") or []:
                if p["name"] not in found or (p.get("image_exists") and not found[p["name"]].get("image_exists")):
                    found[p["name"]] = p
        return [found[n] for n in sorted(found)]

    async def list_profiles(self, request: web.Request) -> web.Response:
        return web.json_response({"profiles": await self.profiles()})

    async def list_images(self, request: web.Request) -> web.Response:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for view, answer in await self.each_node("/v1/images"):
            for i in answer.get("images") or []:
                entry = found.setdefault((i["name"], i["digest"]), {**i, "nodes": []})
                entry["nodes"].append(view.name)
        return web.json_response({"images": [found[k] for k in sorted(found)]})

    async def health(self, request: web.Request) -> web.Response:
        nodes: list[dict[str, Any]] = [{"node": v.name, "url": v.url, "sessions": v.info.get("sessions"),
                  "max_sessions": v.info.get("max_sessions"), "mem_available_mib": v.info.get("mem_available_mib"),
                  "images": [i["name"] for i in v.info.get("images") or []]} for v in self.nodes.values()]
        return web.json_response({
            "status": "ok", "version": __version__, "machinery": "cluster", "viewers": True,
            "sessions": sum(int(n["sessions"] or 0) for n in nodes),
            "max_sessions": sum(int(n["max_sessions"] or 0) for n in nodes),
            "uptime_s": round(time.time() - self.started, 1), "nodes": nodes, "lost_nodes": sorted(self.lost_nodes)})

    # -- one session ------------------------------------------------------------------------------------
    async def session(self, request: web.Request) -> web.StreamResponse:
        gid = request.match_info["id"]
        node, local = ids.split(gid)
        if gid in self.lost and request.method in ("GET", "DELETE") and request.path.rstrip("/").endswith(gid):
            return web.json_response(self.lost[gid])
        view = self.node(node, gid)
        tail = request.path.split(f"/{gid}", 1)[1]
        return await self.relay(request, view, local, f"/v1/sessions/{local}{tail}")

    async def relay(self, request: web.Request, view: NodeView, local: str, path: str) -> web.StreamResponse:
        """One request passed to the node and its answer back: JSON and text rewritten, the rest streamed."""
        assert self.http is not None
        has_body = request.can_read_body
        try:
            r = await self.http.request(request.method, view.url + path, params=request.query,
                                        headers=self._headers(request), data=request.content if has_body else None,
                                        allow_redirects=False, timeout=RELAY_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ServiceError(f"node {view.name} did not answer: {e or type(e).__name__}",
                               hint="the gateway reports it lost if it stays away") from None
        try:
            ctype = r.headers.get("Content-Type", "")
            headers = {k: r.headers[k] for k in HOP_HEADERS if k in r.headers and k != "Content-Length"}
            if "Location" in headers:
                headers["Location"] = rewrite(headers["Location"], view.name, local, view.netloc, self.netloc)
            if ctype.startswith(("application/json", "application/problem+json")):
                data = await r.json(content_type=None)
                out = json.dumps(rewrite(data, view.name, local, view.netloc, self.netloc))
                headers.pop("Content-Type", None)
                return web.Response(text=out, status=r.status, content_type=ctype.split(";")[0], headers=headers)
            if ctype.startswith("text/html") or ctype.startswith("text/plain"):
                text = rewrite(await r.text(), view.name, local, view.netloc, self.netloc)
                headers.pop("Content-Type", None)
                return web.Response(text=text, status=r.status, content_type=ctype.split(";")[0],
                                    charset="utf-8", headers=headers)
            if r.status < 400:
                authenticated(request)
            if "Content-Length" in r.headers:
                headers["Content-Length"] = r.headers["Content-Length"]
            response = web.StreamResponse(status=r.status, headers=headers)
            await response.prepare(request)
            async for chunk in r.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            r.release()

    async def events(self, request: web.Request) -> web.StreamResponse:
        """One session's events from its node (ids rewritten), or every node's, merged; a session whose node is
        lost meanwhile gets its `ended` events from the gateway."""
        gid = request.query.get("session")
        targets: list[tuple[NodeView, str | None]]
        if gid is not None:
            node, local = ids.split(gid)
            targets = [] if gid in self.lost else [(self.node(node, gid), local)]
        else:
            targets = [(v, None) for v in self.nodes.values()]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=sse.QUEUE_MAX)
        tasks = [asyncio.create_task(self._follow(v, local, queue)) for v, local in targets]
        running = len(tasks)
        ended = False
        try:
            if gid is not None and gid in self.lost:
                running = 0
            while running:
                try:
                    item = await asyncio.wait_for(queue.get(), sse.KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    running -= 1
                    continue
                await response.write(item)
                ended = ended or b'"kind":"ended"' in item
            if gid is not None and not ended:  # the node's stream broke off before the end: lost, or about to be
                deadline = time.monotonic() + LOST_AFTER_S + POLL_S + ASK_TIMEOUT_S + 5
                while gid not in self.lost and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                if gid in self.lost:
                    for event in sse.ended_events(self.lost[gid]):
                        await response.write(sse.frame(event))
        except ConnectionError:
            pass
        finally:
            for t in tasks:
                t.cancel()
        return response

    async def _follow(self, view: NodeView, local: str | None, queue: asyncio.Queue[bytes | None]) -> None:
        assert self.http is not None
        try:
            async with self.http.get(view.url + "/v1/events", params={"session": local} if local else None,
                                     headers={**self._headers(), "Accept": "text/event-stream"},
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as r:
                if r.status != 200:
                    return
                data: list[str] = []
                async for raw in r.content:
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line == "" and data:
                        try:
                            event = Event.from_json(json.loads("\n".join(data)))
                        except (ValueError, KeyError, TypeError):
                            data = []
                            continue
                        data = []
                        fields = rewrite(event.fields, view.name, event.session_id, view.netloc, self.netloc)
                        out = Event(event.kind, ids.global_id(view.name, event.session_id), event.message,
                                    fields, event.time)
                        await queue.put(sse.frame(out))
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            pass
        finally:
            await queue.put(None)

    # -- viewers and automation ---------------------------------------------------------------------------
    async def web_path(self, request: web.Request) -> web.StreamResponse:
        """/viewer/NODE~ID/TOKEN/... and /automation/NODE~ID/TOKEN/...: to the node (the token in the path is
        the node's to check), WebSockets included."""
        prefix, gid = request.match_info["prefix"], request.match_info["id"]
        node, local = ids.split(gid)
        view = self.node(node, gid)
        path = f"/{prefix}/{local}/{request.match_info['rest']}"
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request, view, path)
        return await self.relay(request, view, local, path)

    async def websocket(self, request: web.Request, view: NodeView, path: str) -> web.StreamResponse:
        assert self.http is not None
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        url = "ws://" + view.netloc + path + (f"?{request.query_string}" if request.query_string else "")
        try:
            upstream = await self.http.ws_connect(url, protocols=offered, max_msg_size=0, autoping=False,
                                                  timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5))
        except aiohttp.WSServerHandshakeError as e:
            raise _status_error(e.status, f"node {view.name} refused the WebSocket ({e.status})") from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ServiceError(f"node {view.name} did not answer: {e or type(e).__name__}") from None
        authenticated(request)
        ws = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (), max_msg_size=0,
                                   autoping=False)
        await ws.prepare(request)

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await dst.pong(msg.data)
                else:
                    break

        tasks = [asyncio.create_task(pump(ws, upstream)), asyncio.create_task(pump(upstream, ws))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await upstream.close()
            await ws.close()
        return ws

    # -- the dashboard ----------------------------------------------------------------------------------
    async def ui_page(self, request: web.Request) -> web.StreamResponse:
        """/ui/TOKEN/: the node's dashboard page over the cluster's profiles; its script calls the gateway's
        /v1 API like any client, so it lists, starts and ends sessions on every node."""
        dashboard.check_link(request, request.app[TOKEN])
        tail = request.match_info.get("tail")
        if tail is None:  # /ui/TOKEN: the page's relative links need the slash
            raise web.HTTPPermanentRedirect(f"{dashboard.UI_PREFIX}/{request.match_info['token']}/")
        if tail == "":
            return web.Response(text=dashboard.render(await self.profiles()), content_type="text/html",
                                headers={"Content-Security-Policy": dashboard.CSP})
        if (found := dashboard.asset(tail)) is not None:
            return found
        raise web.HTTPNotFound(text="dispod: no such page\n")

    async def ui_of_node(self, request: web.Request) -> web.StreamResponse:
        """/ui/TOKEN/receipt/NODE~ID and /ui/TOKEN/thumb/NODE~ID: from the node that holds the session (which
        takes the cluster secret, the gateway's bearer, instead of its own dashboard's token)."""
        dashboard.check_link(request, request.app[TOKEN])
        gid = request.match_info["id"]
        node, local = ids.split(gid)
        view = self.node(node, gid)
        return await self.relay(request, view, local, f"{dashboard.UI_PREFIX}/-/{request.match_info['page']}/{local}")

    # -- the rest ---------------------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    async def no_pool(self, request: web.Request) -> web.Response:
        raise NotFound("the gateway keeps no warm pool: each node keeps its own ([service] pool in its config)",
                       hint="ask a node's dispod (dispo --dispod http://NODE:PORT pool ls)")

    def routes(self) -> list[web.RouteDef]:
        s = self.session
        return [
            web.post("/v1/sessions", self.create),
            web.get("/v1/sessions", self.list_sessions, allow_head=False),
            web.get("/v1/sessions/{id}", s, allow_head=False),
            web.delete("/v1/sessions/{id}", s),
            web.get("/v1/sessions/{id}/{tail:.+}", s, allow_head=False),
            web.post("/v1/sessions/{id}/{tail:.+}", s),
            web.put("/v1/sessions/{id}/{tail:.+}", s),
            web.delete("/v1/sessions/{id}/{tail:.+}", s),
            web.get("/v1/pool", self.no_pool, allow_head=False),
            web.put("/v1/pool/{name}", self.no_pool),
            web.delete("/v1/pool/{name}", self.no_pool),
            web.get("/v1/profiles", self.list_profiles, allow_head=False),
            web.get("/v1/images", self.list_images, allow_head=False),
            web.get("/v1/events", self.events, allow_head=False),
            web.get("/v1/openapi.json", self.openapi, allow_head=False),
            web.get("/v1/health", self.health, allow_head=False),
            web.route("*", r"/{prefix:viewer|automation}/{id}/{rest:.*}", self.web_path),
            web.get(dashboard.UI_PREFIX + "/{token}/{page:receipt|thumb}/{id}", self.ui_of_node, allow_head=False),
            web.get(dashboard.UI_PREFIX + "/{token}", self.ui_page, allow_head=False),
            web.get(dashboard.UI_PREFIX + "/{token}/{tail:[^/]*}", self.ui_page, allow_head=False),
        ]


def _status_error(status: int, text: str) -> DispoError:
    kind: type[DispoError] = {403: PermissionProblem, 404: NotFound}.get(status, ServiceError)
    return kind(text)


def build_app(gateway: Gateway, token: str, limits: Limits) -> web.Application:
    app = web.Application(client_max_size=limits.max_body, middlewares=MIDDLEWARES)
    app[TOKEN] = token
    app[CONNECTIONS] = Connections()
    app.on_response_prepare.append(security_headers)
    app.add_routes(gateway.routes())
    return app



async def serve(gateway: Gateway, paths: Any, token: str, listen: str, limits: Limits, *, stop: asyncio.Event,
                say: Callable[[str], None], serving: Callable[[str], None] = lambda _url: None) -> None:
    """Serve the gateway on its unix socket and `listen` until `stop` is set; `serving` gets the dashboard's
    URL once both listeners accept."""
    from dispo.web.server import Server, bind_tcp, bind_unix, parse_listen

    unix = bind_unix(paths.socket)
    try:
        tcp = bind_tcp(parse_listen(listen))
    except BaseException:
        unix.close()
        paths.socket.unlink(missing_ok=True)
        raise
    server = Server(build_app(gateway, token, limits), limits, unix=unix, tcp=tcp)
    assert server.tcp is not None
    gateway.netloc = server.tcp.netloc
    try:
        await gateway.start()
        await server.start()
        say(f"gateway listening on unix:{paths.socket} and {server.base_url}; cluster at {gateway.ray_address}")
        serving(f"{server.base_url}{dashboard.UI_PREFIX}/{token}/")
        await stop.wait()
        say("stopping")
    finally:
        await server.close()
        await gateway.close()
        paths.socket.unlink(missing_ok=True)
