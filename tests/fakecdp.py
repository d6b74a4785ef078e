"""A fake browser's debugging endpoint for the fake guest (tests/fakes.py): run in the fake display's process,
before its fake VNC server, when the session asks for automation. It serves on the forwarded unix socket (the
display's argv[2]) what dispod's relay expects of a browser: GET /json/version naming the browser's WebSocket,
that WebSocket (CDP), and /session (WebDriver BiDi). Each WebSocket echoes, and answers a few commands:

    "open?"      how many of its WebSockets are open now (a relay that left one open shows here)
    "big N"      a text message of N bytes (the relay's cap on what the guest sends)
    "close"      it closes the connection (the guest side ends first)
"""

from __future__ import annotations

FAKE_CDP = r"""
import asyncio, sys, threading
def _fake_cdp(path):
    from aiohttp import web, WSMsgType
    opened = set()
    async def version(request):
        return web.json_response({"Browser": "FakeChrome/1.0",
                                  "webSocketDebuggerUrl": "ws://127.0.0.1:9222/devtools/browser/fake-0123"})
    async def ws(request):
        sock = web.WebSocketResponse(max_msg_size=0)
        await sock.prepare(request)
        opened.add(sock)
        try:
            async for msg in sock:
                if msg.type is not WSMsgType.TEXT:
                    await sock.send_bytes(msg.data)
                elif msg.data == "open?":
                    await sock.send_str(str(sum(not s.closed for s in opened)))
                elif msg.data.startswith("big "):
                    await sock.send_str("x" * int(msg.data[4:]))
                elif msg.data == "close":
                    await sock.close()
                else:
                    await sock.send_str(msg.data)
        finally:
            opened.discard(sock)
        return sock
    async def main():
        app = web.Application()
        app.add_routes([web.get("/json/version", version), web.get("/devtools/browser/fake-0123", ws),
                        web.get("/session", ws)])
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, path).start()
        await asyncio.Event().wait()
    asyncio.run(main())
if len(sys.argv) > 2:
    threading.Thread(target=_fake_cdp, args=(sys.argv[2],), daemon=True).start()
"""
