"""The browser features' two numbers (docs/browser-features.md): the sound's delay from the guest to the viewer,
and download throughput through the session's API (its viewer's path, the same handlers as dispod's).

One Chromium session with sound on (the built-in profile plus `audio = true`), in a world of namespaces this
bench creates (never the machine's network), as root:

- Sound delay: a `pacat` in the guest plays what the host feeds it over an already open SSH channel: 10 ms of
  silence every 10 ms, then, at t0, a 440 Hz tone. t1 is when the viewer's sound WebSocket first brings a frame
  that is not silence. t1 - t0 covers the whole path a sound takes (pacat's buffer, PulseAudio's null sink,
  parec, SSH, the WebSocket) plus one SSH hop in (the feed), so it is an upper bound. Repeated --runs times.
- Throughput: a file of --mib MiB made in the guest's ~/Downloads, fetched through GET .../downloads/NAME.

    .venv/bin/python -m bench.features [--runs 5] [--mib 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.netns import PYTHON, REPO, net_world

from bench.browser import PAGE, _build
from bench.common import ARTIFACTS, median, report
from dispo import profiles

RATE = 48000
CHUNK_S = 0.01
THRESHOLD = 2000  # a sample louder than this is the tone (silence is 0; the tone peaks at 12000)

# In the host netns: connect to the viewer's sound socket, print "ready", then the monotonic time of the first
# loud frame (CLOCK_MONOTONIC is the machine's, shared across namespaces), for each of N tones. A tone ends
# after 100 ms of quiet (a short message near a zero crossing is not its end).
LISTENER = r"""
import asyncio, struct, sys, time, aiohttp
url, n, threshold = sys.argv[1].replace("http://", "ws://", 1) + "sound", int(sys.argv[2]), int(sys.argv[3])
async def main():
    async with aiohttp.ClientSession() as s, s.ws_connect(url, protocols=("binary",)) as ws:
        print("ready", flush=True)
        loud, quiet_frames, heard = False, 0, 0
        async for msg in ws:
            now = time.monotonic()
            samples = struct.unpack("<%dh" % (len(msg.data) // 2), msg.data[: len(msg.data) // 2 * 2])
            peak = max((abs(x) for x in samples), default=0)
            if peak > threshold:
                quiet_frames = 0
                if not loud:
                    loud = True
                    print(now, flush=True)
                    heard += 1
                    if heard == n:
                        return
            else:
                quiet_frames += len(samples) // 2
                if quiet_frames > 4800:
                    loud = False
asyncio.run(main())
"""


def _pcm(seconds: float, hz: float = 0.0) -> bytes:
    n = int(RATE * seconds)
    return b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / RATE)) if hz else 0)
                    for i in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-features-")))
        w = stack.enter_context(net_world(tmp / "w"))
        (w.root / "www-inet" / "bench.html").write_text(PAGE)
        _build(w.env(), "chromium", False)
        pdir = w.root / "profiles"
        pdir.mkdir()
        text = (profiles.BUILTIN_DIR / "chromium.toml").read_text().replace("audio = false", "audio = true")
        (pdir / "chromium.toml").write_text(text)
        w.config.write_text(f'profiles_dir = "{pdir}"\n[net]\nlink = "tap"\ndns = "none"\n')
        log = tmp / "run.log"
        run = w.spawn(w.dispo_argv("run", "chromium", "about:blank"), env=w.env(), stdout=subprocess.PIPE,
                      stderr=log.open("w"))
        stack.callback(run.wait, 120)
        stack.callback(run.send_signal, signal.SIGTERM)
        assert run.stdout is not None
        viewer = ""
        while not viewer.startswith("http://127.0.0.1:"):
            viewer = run.stdout.readline().strip()
            assert run.poll() is None, log.read_text()
        sid = next(p.parent.name for p in (w.state_dir / "sessions").glob("*/ssh.json"))
        time.sleep(20)  # the browser settles (under TCG it keeps the CPUs busy for a while after its page)

        # Sound delay.
        play = ("echo started >&2; PULSE_SERVER=unix:/tmp/dispo-pulse/native exec pacat --raw --rate=48000 "
                "--channels=1 --format=s16le --latency-msec=10")
        feed: subprocess.Popen[bytes] = subprocess.Popen(w.dispo_argv("ssh", sid, "--", "sh", "-c", play),
                                                         env=w.env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                                         start_new_session=True)
        assert feed.stderr is not None and b"started" in feed.stderr.readline()  # nothing waits in the pipe
        stack.callback(feed.kill)
        listener = subprocess.Popen(["nsenter", f"--net=/run/netns/{w.host}", PYTHON, "-c", LISTENER, viewer,
                                     str(args.runs + 1), str(THRESHOLD)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        stack.callback(listener.kill)
        assert listener.stdout is not None and feed.stdin is not None
        assert listener.stdout.readline().strip() == "ready"
        silence, tone = _pcm(CHUNK_S), _pcm(0.3, 440)
        delays = []
        # The first tone warms the path up (the feed's SSH channel opens meanwhile, and silence written before
        # pacat reads it waits in the pipe): not counted. The feed is paced no faster than real time, so no
        # backlog builds later (an underrun is silence, which this is anyway).
        for _ in range(args.runs + 1):
            for _ in range(150):  # 1.5 s of silence, a little slower than real time: nothing queues up
                feed.stdin.write(silence)
                feed.stdin.flush()
                time.sleep(CHUNK_S * 1.2)
            t0 = time.monotonic()
            feed.stdin.write(tone)
            feed.stdin.flush()
            heard = float(listener.stdout.readline())
            delays.append(heard - t0)
            for _ in range(50):
                feed.stdin.write(silence)
                feed.stdin.flush()
                time.sleep(CHUNK_S * 1.2)

        # Download throughput through the viewer's API path.
        made = w.dispo("ssh", sid, "--", "sh", "-c", f"mkdir -p ~/Downloads && head -c {args.mib}M /dev/zero "
                                                     f"> ~/Downloads/bench.bin", timeout=600)
        assert made.returncode == 0, made.stderr
        t = time.monotonic()
        got = subprocess.run(["nsenter", f"--net=/run/netns/{w.host}", "curl", "-s", "-o", "/dev/null", "-w",
                              "%{size_download}", viewer + "downloads/bench.bin"], capture_output=True, text=True,
                             timeout=600, check=True)
        seconds = time.monotonic() - t
        size = int(got.stdout)
        assert size == args.mib << 20, got.stdout

    delays = delays[1:]
    rows = [(f"{d * 1000:.0f} ms",) for d in delays]
    report("features", ("sound delay guest -> viewer",), rows, {
        "sound_delay_ms": [round(d * 1000, 1) for d in delays],
        "sound_delay_median_ms": round(median(delays) * 1000, 1),
        "download_mib": args.mib, "download_s": round(seconds, 2), "download_mib_s": round(args.mib / seconds, 1)})
    print(json.dumps({"sound_delay_median_ms": round(median(delays) * 1000, 1),
                      "download_mib_s": round(args.mib / seconds, 1)}))


if __name__ == "__main__":
    main()
