"""`dispo demo`: the disk lifecycle on embedded defaults, end to end, with what happened at each step."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from dispo.config import Config
from dispo.errors import NotFound
from dispo.infra.proc import run
from dispo.storage.disks import open_session
from dispo.storage.images import ImageStore

DEMO_IMAGE = "dispo-demo"
MARKER = "/written-in-session.txt"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="show a disposable disk's life: import, write in a session, discard")
    p.set_defaults(func=cmd_demo)


def _say(step: str) -> None:
    print(f"==> {step}", flush=True)


def _has_file(image_file: Path, path: str) -> bool:
    # debugfs reads the ext4 image directly: no loop mount, nothing to clean up.
    out = run(["debugfs", "-R", f"stat {path}", image_file], check=False, hint="install e2fsprogs")
    return "Inode:" in out.stdout


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    store = ImageStore(cfg)
    with tempfile.TemporaryDirectory(prefix="dispo-demo-") as tmp:
        root = Path(tmp) / "root"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "hostname").write_text("dispo-demo\n")
        (root / "README").write_text("A known-good image: sessions may write here, the image never changes.\n")
        src = Path(tmp) / "demo.ext4"
        _say(f"building a 64 MiB ext4 root filesystem with mkfs.ext4 -d ({src})")
        run(["mkfs.ext4", "-q", "-F", "-L", "dispo-demo", "-d", root, src, "64M"], hint="install e2fsprogs")
        try:
            store.remove(DEMO_IMAGE)
            _say(f"removed the previous {DEMO_IMAGE} image")
        except NotFound:
            pass
        _say(f"importing it as image {DEMO_IMAGE} into {cfg.workspace}, grown to 128 MiB")
        image = store.import_(src, DEMO_IMAGE, 128 << 20)
        print(f"    storage backend: {image.storage.value}; sha256 {image.sha256}")

    t0 = time.monotonic()
    with open_session(cfg, image=DEMO_IMAGE, name="demo") as s:
        _say(f"session {s.session_id}: private disk {s.disk} ready in {time.monotonic() - t0:.3f} s")
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as note:
            note.write(f"written by session {s.session_id}\n")
            note.flush()
            run(["debugfs", "-w", "-R", f"write {note.name} {MARKER}", s.disk])
        print(f"    {MARKER} in the session disk: {_has_file(s.disk, MARKER)}")
        print(f"    {MARKER} in the image:        {_has_file(image.rootfs, MARKER)}")
        disk_dir = s.disk.parent
        _say(f"ending session {s.session_id}")
    print(f"    session disk still exists: {disk_dir.exists()}")
    same = store.verify(DEMO_IMAGE)
    print(f"    image hash unchanged: {same}")
    print(f"    {MARKER} in the image: {_has_file(image.rootfs, MARKER)}")
    _say("done: the session's writes are gone and the known-good image is untouched")
    return 0 if same and not disk_dir.exists() else 1
