"""What people expect of a disposable browser, end to end on a real Chromium guest (QEMU/TCG): downloads out
(the viewer's API and `--downloads DIR`), uploads in, the clipboard both ways, sound in the viewer, and a
profile kept on purpose (`--keep NAME`).

The pages come from the test's "internet" netns: tests/test_browser.py's page.html (RED when it finds the
localStorage value that `?set` stores, GREEN otherwise) and a server that sends a file as an attachment under
a hostile name ("../"). Every request goes through the session's viewer (the same handlers as dispod's API);
what the guest holds is read inside the guest over `dispo ssh`. After each session, the listing of host
objects equals the one before (a kept volume is the one thing that stays, and the receipt says so).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
from pathlib import Path

from tests.guests import (
    GREEN,
    PAGE_URL,
    RED,
    GuestImages,
    chromium_profile,
    listing,
    session_id,
    shot,
    spawn_run,
    viewer_url,
    wait_listening,
)
from tests.netns import INTERNET, PYTHON, REPO, NetWorld, in_ns

FILES_PORT = 8091
HOSTILE_NAME = "../../escape me.bin"
TONE_HZ = 440


def _curl(w: NetWorld, *args: str) -> subprocess.CompletedProcess[str]:
    return in_ns(w.host, "curl", "-s", "--max-time", "60", *args, check=False)


def _guest(w: NetWorld, sid: str, script: str) -> subprocess.CompletedProcess[str]:
    return w.dispo("ssh", sid, "--", "sh", "-c", script, timeout=90)


def _dominant_hz(pcm: bytes, rate: int = 48000) -> float:
    """The strongest frequency (Goertzel, 200-2000 Hz in 5 Hz steps) of the loudest half second, left channel."""
    samples = [s[0] for s in struct.iter_unpack("<hh", pcm[: len(pcm) // 4 * 4])]
    window = rate // 2
    best_start, best_energy = 0, -1.0
    for start in range(0, max(1, len(samples) - window), window // 2):
        energy = sum(x * x for x in samples[start:start + window:8])
        if energy > best_energy:
            best_start, best_energy = start, energy
    chunk = samples[best_start:best_start + window:4]  # 12 kHz is plenty below 2 kHz
    r = rate / 4
    best_f, best_p = 0.0, -1.0
    for f in range(200, 2001, 5):
        coeff = 2 * math.cos(2 * math.pi * f / r)
        s1 = s2 = 0.0
        for x in chunk:
            s1, s2 = x + coeff * s1 - s2, s1
        power = s1 * s1 + s2 * s2 - coeff * s1 * s2
        if power > best_p:
            best_f, best_p = float(f), power
    return best_f


def _run_page(w: NetWorld, tmp_path: Path, tag: str, query: str, colour: str, *args: str
              ) -> tuple[str, str, Path]:
    """A `feat` session on page.html?QUERY, seen in the viewer with `colour`: (viewer URL, session id, log)."""
    log = tmp_path / f"run-{tag}.log"
    run = spawn_run(w, "feat", f"{PAGE_URL}?{query}", *args, log=log)
    viewer = viewer_url(run, log)
    sid = session_id(w, run, log)
    seen = shot(w, viewer, f"features-{tag}.png", colour)
    assert seen["seen"], f"session {tag}: the page did not show {colour}: {seen}"
    _RUNS[sid] = run
    return viewer, sid, log


_RUNS: dict[str, subprocess.Popen[str]] = {}


def _end(w: NetWorld, viewer: str, sid: str, log: Path, *, tag: str, colour: str) -> None:
    """End the session with the viewer's button; its dispo run exits 0."""
    ended = shot(w, viewer, f"features-{tag}-end.png", colour, end=True)
    assert ended.get("ended"), ended
    assert _RUNS.pop(sid).wait(120) == 0, log.read_text()


def test_browser_features_and_kept_volume(browser_world: NetWorld, guest_images: GuestImages, chromium_template: str,
                                          tmp_path: Path) -> None:
    """Session 1 keeps a volume and stores a value (RED); session 2 with the same --keep finds the value (RED)
    and carries the downloads, uploads, clipboard and sound checks; session 3, without --keep, starts fresh
    (GREEN) while the volume is there. Nothing but the volume stays, and the receipts say which session kept it.

    A kept volume is mounted at boot, so sessions 1 and 2 boot cold; session 3 needs a running browser but
    does not test its boot: it is a clone of the chromium template (tests/guests.py, built once per run)."""
    w = browser_world
    chromium_profile(w, "feat", f"http://{INTERNET}:{FILES_PORT}", sound=True)
    guest_images.give_template(w, chromium_template)
    before = listing(w)

    viewer, sid, log = _run_page(w, tmp_path, "keep1", "set", RED, "--keep", "vol1")
    vols = json.loads(w.dispo("volume", "ls", "--json").stdout)["volumes"]
    assert [(v["name"], v["in_use"]) for v in vols] == [("vol1", True)], vols
    busy = w.dispo("volume", "rm", "vol1")
    assert busy.returncode != 0 and "in use" in busy.stderr, busy
    mounted = _guest(w, sid, "findmnt -n -o SOURCE,TARGET ~/.config/chromium")
    assert mounted.stdout.split()[1:] == ["/home/user/.config/chromium"], mounted
    _end(w, viewer, sid, log, tag="keep1", colour=RED)
    assert listing(w) == before
    receipt = json.loads(w.dispo("receipt", sid, "--json").stdout)
    assert receipt["clean"] and any("volume vol1" in k for k in receipt["kept"]), receipt
    assert "kept volume vol1" in log.read_text(), log.read_text()

    _features(w, tmp_path, before)  # session 2: --keep vol1 again (RED)

    log = tmp_path / "run-fresh.log"
    fresh = spawn_run(w, "chromium", f"{PAGE_URL}?check", log=log)
    seen = shot(w, viewer_url(fresh, log), "features-fresh.png", GREEN, end=True)
    assert seen["seen"], f"a session without --keep saw the kept volume's storage (not GREEN): {seen}"
    assert seen.get("ended"), seen
    assert fresh.wait(120) == 0, log.read_text()
    assert "restoring from template profile-chromium" in log.read_text(), log.read_text()
    assert listing(w) == before
    vols = json.loads(w.dispo("volume", "ls", "--json").stdout)["volumes"]
    assert [(v["name"], v["in_use"]) for v in vols] == [("vol1", False)], vols
    removed = w.dispo("volume", "rm", "vol1")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(w.dispo("volume", "ls", "--json").stdout)["volumes"] == []


def _features(w: NetWorld, tmp_path: Path, before: dict[str, object]) -> None:
    www = w.root / "www-files"
    www.mkdir()
    payload = os.urandom(3 << 20) + b"dispo"
    (www / "payload.bin").write_bytes(payload)
    w.spawn(["nsenter", f"--net=/run/netns/{w.internet}", PYTHON, "-m", "tests.logging_servers", "http",
             INTERNET, str(FILES_PORT), www, w.root / "files.log"], cwd=REPO, stderr=(w.root / "files.err").open("w"))
    wait_listening(w.internet, "t", INTERNET, FILES_PORT)
    out = tmp_path / "downloads"
    out.mkdir()
    (tmp_path / "marker").write_text("outside DIR")
    outside_before = sorted(p.name for p in tmp_path.iterdir())

    viewer, sid, log = _run_page(w, tmp_path, "features", "check", RED, "--keep", "vol1", "--downloads", str(out))

    # Download: the running browser is handed the attachment's URL (as a link click would).
    url = f"http://{INTERNET}:{FILES_PORT}/attachment?file=payload.bin&name={HOSTILE_NAME.replace(' ', '%20')}"
    opened = _guest(w, sid, f"DISPLAY=:1 dispo-open chromium '{url}'")
    assert opened.returncode == 0, opened.stderr
    listed: list[dict[str, object]] = []
    for _ in range(120):
        listed = json.loads(_curl(w, viewer + "downloads").stdout or "{}").get("downloads", [])
        if any(d["complete"] for d in listed) and any(out.iterdir()):
            break
        subprocess.run(["sleep", "1"], check=True)
    done = [d for d in listed if d["complete"]]
    assert len(done) == 1 and done[0]["size"] == len(payload), (listed, _guest(w, sid, "ls -la ~/Downloads").stdout)
    name = str(done[0]["name"])
    fetched = tmp_path / "fetched.bin"
    got = _curl(w, "-o", str(fetched), "-w", "%{http_code}", viewer + "downloads/" + name.replace(" ", "%20"))
    assert got.stdout == "200", got
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    copied = list(out.iterdir())
    assert len(copied) == 1 and copied[0].read_bytes() == payload, copied
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*outside_before, "fetched.bin", log.name])
    assert "/" not in copied[0].name and not copied[0].name.startswith("."), copied

    # Upload: into ~/Uploads, same bytes.
    up = tmp_path / "up.bin"
    up.write_bytes(os.urandom(1 << 20))
    posted = _curl(w, "--data-binary", f"@{up}", "-H", "Content-Type: application/octet-stream",
                   viewer + "uploads?name=up.bin")
    assert json.loads(posted.stdout)["name"] == "up.bin", posted
    in_guest = _guest(w, sid, "sha256sum ~/Uploads/up.bin")
    assert in_guest.stdout.split()[0] == hashlib.sha256(up.read_bytes()).hexdigest(), in_guest

    # Clipboard, both ways, as the guest's X clipboard holds it.
    text = "from the host: dispo ✓"
    put = _curl(w, "-X", "PUT", "-H", "Content-Type: application/json", "--data", json.dumps({"text": text}),
                viewer + "clipboard")
    assert json.loads(put.stdout)["text"] == text, put
    held = _guest(w, sid, "DISPLAY=:1 xclip -selection clipboard -o")
    assert held.stdout == text, held
    _guest(w, sid, "printf 'copied in the guest' | DISPLAY=:1 xclip -selection clipboard -i >/dev/null 2>&1")
    back = json.loads(_curl(w, viewer + "clipboard").stdout)
    assert back["text"] == "copied in the guest", back

    # Sound: a 440 Hz tone played in the guest, as the viewer receives it.
    pcm = tmp_path / "sound.raw"
    listener = subprocess.Popen(["nsenter", f"--net=/run/netns/{w.host}", PYTHON, "-m", "tests.viewer_io", "sound",
                                 viewer, "20", str(pcm)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # communicate() closes stdin: "played", it ends
    assert listener.stderr is not None
    assert "connected" in listener.stderr.readline()
    tone = (f"perl -e 'for $i (0..48000*3) {{ print pack(\"s<\", 12000*sin(2*3.14159265*{TONE_HZ}*$i/48000)) }}' | "
            "PULSE_SERVER=unix:/tmp/dispo-pulse/native pacat --raw --rate=48000 --channels=1 --format=s16le")
    played = _guest(w, sid, tone)
    assert played.returncode == 0, played.stderr
    stats = json.loads(listener.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert stats["bytes"] > 48000 * 4, stats
    assert abs(_dominant_hz(pcm.read_bytes()) - TONE_HZ) <= 5

    # The end: nothing left, and the copied download stays where the user asked for it.
    _end(w, viewer, sid, log, tag="features", colour=RED)
    assert listing(w) == before
    assert "copied to" in log.read_text()
    assert "kept volume vol1" in log.read_text(), log.read_text()
