"""Run inside the test's "host" netns (where the viewer listens on 127.0.0.1): collect a session's sound from
its viewer, the way viewer.js gets it (a WebSocket beside the viewer page).

    python -m tests.viewer_io sound VIEWER_URL SECONDS OUT   raw s16le 48 kHz stereo into OUT; prints JSON

It listens for SECONDS at most, or until a line (or the end) on its stdin says the sound was played, and then
for GRACE_S more: what the viewer still has in flight (rather than the rest of SECONDS of silence).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

GRACE_S = 2.0


async def sound(url: str, seconds: float, out: Path) -> dict[str, object]:
    ws_url = url.replace("http://", "ws://", 1).rstrip("/") + "/sound"
    got = bytearray()
    first = None
    t0 = time.monotonic()
    end = t0 + seconds

    async def until_played() -> None:
        nonlocal end
        await asyncio.to_thread(sys.stdin.readline)
        end = min(end, time.monotonic() + GRACE_S)

    played = asyncio.create_task(until_played())
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, protocols=("binary",)) as ws:
        print("connected", file=sys.stderr, flush=True)
        while (left := end - time.monotonic()) > 0:
            try:
                msg = await ws.receive(timeout=min(left, 0.25))  # a short wait: `end` may move meanwhile
            except TimeoutError:
                continue
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            if first is None:
                first = time.monotonic() - t0
            got += msg.data
    played.cancel()  # its thread still waits on stdin: the caller ends it (communicate() closes stdin)
    out.write_bytes(bytes(got))
    return {"bytes": len(got), "first_s": first}


def main() -> int:
    if sys.argv[1] == "sound":
        print(json.dumps(asyncio.run(sound(sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])))))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
