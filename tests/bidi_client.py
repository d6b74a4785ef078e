"""A program that drives a dispo session's Firefox over its bidi_url (WebDriver BiDi, with aiohttp's WebSocket
client, on the host), run inside the netns where dispod listens: `python -m tests.bidi_client BIDI_URL PAGE_URL`.
It starts a BiDi session (`session.new`), finds the top-level browsing context (`browsingContext.getTree`),
navigates it to PAGE_URL waiting for the load (`browsingContext.navigate`, wait "complete"), reads the page's
title (`script.evaluate`) and ends the session. Prints JSON: the browser's name and version, the navigation's
URL and the title.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from typing import Any

import aiohttp

TIMEOUT_S = 240.0  # under TCG the browser's first answers take a while


class Bidi:
    """Commands and their answers over one WebSocket; events (messages without an id) are skipped."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def __call__(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), TIMEOUT_S)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"{method}: the connection ended ({msg.type.name}: {msg.data})")
            answer = json.loads(msg.data)
            if answer.get("id") != n:
                continue
            if answer.get("type") != "success":
                raise RuntimeError(f"{method}: {answer}")
            result: dict[str, Any] = answer["result"]
            return result


async def drive(bidi_url: str, page_url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.ws_connect(bidi_url, timeout=aiohttp.ClientWSTimeout(
            ws_close=10)) as ws:
        call = Bidi(ws)
        session = await call("session.new", capabilities={})
        caps = session["capabilities"]
        tree = await call("browsingContext.getTree", maxDepth=0)
        context = tree["contexts"][0]["context"]
        nav = await call("browsingContext.navigate", context=context, url=page_url, wait="complete")
        title = await call("script.evaluate", expression="document.title", target={"context": context},
                           awaitPromise=False)
        await call("session.end")
        return {"browser": caps["browserName"], "version": caps["browserVersion"], "contexts": len(tree["contexts"]),
                "url": nav["url"], "title": title["result"].get("value")}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(drive(sys.argv[1], sys.argv[2]))))
