"""QEMU guests end to end: image build time and size, then `dispo run --image minimal -- true` five times:
time to guest ready (SSH answers), to CMD done, and teardown (CMD done to dispo's exit), with medians.

Runs as root inside namespaces it creates (tests/netns.py: a host netns with a NAT uplink into an
"internet" netns), never on the machine's own network. Accelerator: whatever dispo probes (TCG here).

    .venv/bin/python -m bench.vm [--runs 5] [--cached]   (--cached: skip the fresh image build)
    .venv/bin/python -m bench.vm --arch arm64            (minimal-arm64: built through qemu-user, an aarch64
                                                          guest on qemu-system-aarch64 -M virt, TCG on x86_64)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tests.netns import DISPO, net_world
from tests.worlds import loop_fs

from bench.common import median, report
from dispo.imagebuild import product_path, recipes

READY = re.compile(r"ready in ([0-9.]+) s \(guest [0-9.]+, qemu/(\w+)\)")
DONE = re.compile(r"command exited with status \d+ after ([0-9.]+) s")


def _build(env: dict[str, str], dispo: list[str], rebuild: bool, arch: str = "amd64") -> dict[str, float | str]:
    t0 = time.perf_counter()
    argv = [*dispo, "image", "build", "minimal", "--arch", arch, "--quiet", *(["--rebuild"] if rebuild else [])]
    subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    product = product_path(recipes.get("minimal", arch))
    meta = json.loads((product / "build.json").read_text())
    rootfs = product / "rootfs.ext4"
    alloc = int(subprocess.run(["du", "-B1", "-s", rootfs], capture_output=True, text=True, check=True)
                .stdout.split()[0])
    return {"build_s": round(wall if rebuild else float(meta["seconds"]), 1), "fresh_build": str(rebuild),
            "rootfs_apparent_mib": round(rootfs.stat().st_size / 2**20, 1),
            "rootfs_allocated_mib": round(alloc / 2**20, 1),
            "kernel_mib": round((product / "vmlinuz").stat().st_size / 2**20, 1),
            # arm64: the uncompressed Image both VMMs boot (vmlinuz is Debian's gzip'd one)
            **({"image_mib": round((product / "Image").stat().st_size / 2**20, 1)}
               if (product / "Image").exists() else {}),
            "initrd_mib": round((product / "initrd.img").stat().st_size / 2**20, 1),
            "kernel_version": str(meta["kernel_version"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cached", action="store_true", help="do not rebuild the image: report the cached build")
    ap.add_argument("--plain-workspace", action="store_true",
                    help="workspace on the temp dir's filesystem (plain copies) instead of a loop-mounted btrfs")
    ap.add_argument("--arch", default="amd64", choices=("amd64", "arm64"),
                    help="the guest's architecture (arm64 on this x86_64 host: emulated by TCG)")
    args = ap.parse_args()
    image = "minimal" if args.arch == "amd64" else f"minimal-{args.arch}"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-vm-")))
        w = stack.enter_context(net_world(tmp / "w"))
        w.write_config(link="tap", dns="none")
        env = w.env()
        if not args.plain_workspace:  # session disks as btrfs snapshots, as a real install would have them
            env["DISPO_WORKSPACE"] = str(stack.enter_context(loop_fs(tmp / "fs", "btrfs", "4G")) / "ws")
        # In the machine's own namespace: apt must reach the mirror (the world's host namespace cannot).
        build = _build(env, DISPO, not args.cached, args.arch)
        rows: list[tuple[int | str, ...]] = []
        accel = "?"
        for i in range(args.runs):
            t0 = time.perf_counter()
            p = subprocess.run(w.dispo_argv("run", "--image", image, "--", "true"), env=env, timeout=600,
                               capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            ready, done = READY.search(p.stderr), DONE.search(p.stderr)
            if p.returncode != 0 or not ready or not done:
                raise SystemExit(f"run {i + 1} failed ({p.returncode}): {p.stderr}")
            accel = ready.group(2)
            r, d = float(ready.group(1)), float(done.group(1))
            rows.append((i + 1, f"{r:.2f}", f"{d:.2f}", f"{wall - d:.2f}", f"{wall:.2f}"))
        med = {k: round(median([float(row[j]) for row in rows]), 2)
               for j, k in ((1, "ready_s"), (2, "cmd_done_s"), (3, "teardown_s"), (4, "total_s"))}
        rows.append(("median", f"{med['ready_s']:.2f}", f"{med['cmd_done_s']:.2f}", f"{med['teardown_s']:.2f}",
                     f"{med['total_s']:.2f}"))
        print(f"image build: {build['build_s']} s ({'fresh' if not args.cached else 'cached figure'}); "
              f"rootfs {build['rootfs_apparent_mib']} MiB ({build['rootfs_allocated_mib']} MiB allocated), "
              f"kernel {build['kernel_mib']} MiB, initrd {build['initrd_mib']} MiB; accelerator {accel}")
        topic = "vm" if args.arch == "amd64" else f"vm-{args.arch}"
        report(topic, ("run", "ready_s", "cmd_done_s", "teardown_s", "total_s"), rows,
               {"build": build, "accel": accel, "median": med, "runs": args.runs,
                "workspace": "plain copies" if args.plain_workspace else "btrfs snapshots",
                "what": f"dispo run --image {image} -- true under QEMU "
                        f"{'microvm' if args.arch == 'amd64' else 'virt (aarch64)'}; ready = SSH answers"})


if __name__ == "__main__":
    main()
