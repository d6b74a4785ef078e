"""Time to create a session disk from a 1 GiB and an 8 GiB image, per storage backend.

The images are filled with real data (not holes), so a copy has to move every byte. Expected ratio
t(8 GiB)/t(1 GiB): about 1 for btrfs snapshots and reflinks, about 8 for plain copies. The row "auto"
is an ext4 workspace with the default settings: its btrfs pool (storage/pool.py), about 1 too.
Runs as root on loop-mounted filesystems in a temp dir (needs ~30 GB free, takes a few minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.worlds import loop_fs, make_config, sh

from bench.common import median, report
from dispo.config import Config, StorageBackend, StoragePool
from dispo.storage.disks import open_session
from dispo.storage.images import ImageStore

GiB = 1 << 30


def make_filled_image(path: Path, size: int) -> None:
    """An ext4 image of `size` whose files fill ~90 % of it with non-zero data."""
    root = path.with_suffix(".root")
    root.mkdir()
    chunk = os.urandom(8 << 20)
    with open(root / "blob", "wb") as f:
        for _ in range(int(size * 0.9) // len(chunk)):
            f.write(chunk)
    sh("mkfs.ext4", "-q", "-F", "-d", root, path, f"{size >> 20}M")  # a bare number would mean KiB
    (root / "blob").unlink()
    root.rmdir()


def clone_times(cfg: Config, images: list[str], repeats: int) -> dict[str, list[float]]:
    """Time only the disk creation (entering the session); the discard is not timed. The images take turns,
    round by round, so the host's other work weighs on each alike."""

    def create_only(image: str) -> float:
        t0 = time.perf_counter()
        ctx = open_session(cfg, image=image)
        ctx.__enter__()
        dt = time.perf_counter() - t0
        ctx.__exit__(None, None, None)
        return dt

    sh("sync")  # the imports' writeback is not a clone's cost
    for image in images:
        create_only(image)  # warm-up: the first session of each image is not "second and later"
    times: dict[str, list[float]] = {image: [] for image in images}
    for _ in range(repeats):
        for image in images:
            times[image].append(create_only(image))
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--large", default="8", help="size of the large image in GiB")
    ap.add_argument("--only", choices=[b.value for b in StorageBackend],
                    action="append", help="only these backends (repeatable)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench.disk: run as root (loop-mounted filesystems)", file=sys.stderr)
        return 1
    large = int(args.large) * GiB
    rows = []
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dispo-bench-", dir="/var/tmp") as tmpd:
        tmp = Path(tmpd)
        sizes = {"1GiB": GiB, f"{args.large}GiB": large}
        srcs = {}
        for label, size in sizes.items():
            print(f"making a {label} image filled with data...", file=sys.stderr, flush=True)
            srcs[label] = tmp / f"src-{label}.ext4"
            make_filled_image(srcs[label], size)
        need = f"{(large + GiB) * 3 // GiB + 4}G"
        with loop_fs(tmp / "btrfs", "btrfs", need) as bt, loop_fs(tmp / "ext4", "ext4", need) as e4:
            setups = [(StorageBackend.BTRFS, bt / "ws-btrfs"), (StorageBackend.REFLINK, bt / "ws-reflink"),
                      (StorageBackend.COPY, e4 / "ws-copy"), (StorageBackend.AUTO, e4 / "ws-auto")]
            for kind, ws in setups:
                if args.only and kind.value not in args.only:
                    continue
                # auto on ext4: the default settings, so the workspace makes its btrfs pool
                pool = StoragePool.LOOP_BTRFS if kind is StorageBackend.AUTO else StoragePool.NONE
                cfg = make_config(ws, tmp / f"state-{kind}", kind, pool)
                store = ImageStore(cfg)
                results[kind.value] = {}
                for label, src in srcs.items():
                    print(f"{kind.value}: importing {label}...", file=sys.stderr, flush=True)
                    store.import_(src, f"img{label.lower()}", quiet=True)
                reps = args.repeats if kind is not StorageBackend.COPY else max(3, args.repeats // 2)
                times = clone_times(cfg, [f"img{label.lower()}" for label in srcs], reps)
                for label in srcs:
                    results[kind.value][label] = median(times[f"img{label.lower()}"])
                small, big = results[kind.value]["1GiB"], results[kind.value][f"{args.large}GiB"]
                name = "auto (ext4 + pool)" if kind is StorageBackend.AUTO else kind.value
                rows.append((name, f"{small * 1000:.1f} ms", f"{big * 1000:.1f} ms", f"{big / small:.2f}"))
                for label in srcs:
                    store.remove(f"img{label.lower()}")
    report("disk", ("backend", "t(1 GiB)", f"t({args.large} GiB)", "ratio"), rows, {"seconds": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
