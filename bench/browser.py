"""The disposable browser: image build time and size, then `dispo run chromium --display web URL` a few
times: time from `dispo run` to the guest's SSH, to the viewer URL (the guest's display answers), to the
page visible in the viewer (Playwright + Debian's chromium on the host sees the page's colour), and the
teardown after the viewer's End-session button.

Runs as root inside namespaces it creates (tests/netns.py), never on the machine's own network; the page is
served from the world's "internet" netns. Accelerator: whatever dispo probes (TCG here; the table says).

    .venv/bin/python -m bench.browser [--runs 3] [--rebuild] [--recipe chromium] [--arch arm64]

--arch arm64 builds RECIPE-arm64 through qemu-user and runs it as an aarch64 guest (qemu-system-aarch64
-M virt; TCG emulation on an x86_64 host), through a profile that is the built-in one on that image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import select
import subprocess
import tempfile
import time
from pathlib import Path

from tests.netns import DISPO, INTERNET, INTERNET_PORT, PYTHON, REPO, NetWorld, net_world

from bench.common import ARTIFACTS, median, report
from dispo.imagebuild import product_path, recipes

READY = re.compile(r"ready in ([0-9.]+) s \(guest [0-9.]+, (\w+)/(\w+)\)")
COLOUR = "1e90ff"
PAGE = (f'<!doctype html><title>bench</title><body style="margin:0"><div style="position:fixed;inset:0;'
        f'background:#{COLOUR};font:64px sans-serif">dispo bench page</div>')


def _build(env: dict[str, str], recipe: str, rebuild: bool, arch: str = "amd64",
           product: Path | None = None) -> dict[str, float | str]:
    t0 = time.perf_counter()
    if product is None:
        argv = [*DISPO, "image", "build", recipe, "--arch", arch, "--quiet", *(["--rebuild"] if rebuild else [])]
        subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=3600)
        product = product_path(recipes.get(recipe, arch))
    else:  # a cached build made earlier (its key may name guest files that changed since): imported as it is
        name = recipe if arch == "amd64" else f"{recipe}-{arch}"
        code = ("import sys; from pathlib import Path; from dispo import config; "
                "from dispo.imagebuild import Product, import_product, recipes; "
                "p = Product.load(Path(sys.argv[1])); assert p is not None, 'not a build product'; "
                "import_product(config.load(), recipes.get(sys.argv[2], sys.argv[3]), p, sys.argv[4], quiet=True)")
        subprocess.run([str(PYTHON), "-c", code, str(product), recipe, arch, name], env=env, check=True,
                       capture_output=True, text=True, timeout=3600, cwd=REPO)
    wall = time.perf_counter() - t0
    meta = json.loads((product / "build.json").read_text())
    rootfs = product / "rootfs.ext4"
    alloc = int(subprocess.run(["du", "-B1", "-s", rootfs], capture_output=True, text=True, check=True)
                .stdout.split()[0])
    return {"recipe": recipe, "build_s": round(wall if rebuild else float(meta["seconds"]), 1),
            "fresh_build": str(rebuild), "rootfs_apparent_mib": round(rootfs.stat().st_size / 2**20, 1),
            "rootfs_allocated_mib": round(alloc / 2**20, 1), "kernel_version": str(meta["kernel_version"])}


def _one(w: NetWorld, profile: str, url: str, n: int, *extra: str, page_timeout: int = 300
         ) -> tuple[tuple[str, ...], str]:
    """One run: the table's row, and what dispo printed on stderr."""
    env, host_ns = w.env(), w.host
    t0, t0_wall = time.perf_counter(), time.time()
    proc = w.spawn(w.dispo_argv("run", profile, "--display", "web", url, *extra), env=env, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    assert proc.stdout is not None
    viewer = ""
    while not viewer:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"run {n}: dispo ended without a viewer URL: {proc.communicate()[1]}")
            if line.startswith("http://127.0.0.1:"):
                viewer = line.strip()
        if time.perf_counter() - t0 > 600:
            raise SystemExit(f"run {n}: no viewer URL after 600 s")
    t_url = time.perf_counter() - t0
    shot = ARTIFACTS / f"bench-browser-{n}.png"
    p = subprocess.run(["nsenter", f"--net=/run/netns/{host_ns}", str(PYTHON), "-m", "tests.viewer_shot", viewer,
                        str(shot), COLOUR, str(page_timeout), "--end"], capture_output=True, text=True, cwd=REPO,
                       timeout=page_timeout + 100,
                       check=False)
    result = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    if not result.get("seen"):
        raise SystemExit(f"run {n}: the page did not show in the viewer: {p.stdout} {p.stderr}")
    # When the screenshot that saw the page was taken (an upper bound: it includes starting Playwright).
    t_visible = float(result["seen_at"]) - t0_wall
    _, err = proc.communicate(timeout=300)
    teardown = time.time() - float(result["end_at"])  # End session pressed -> dispo exited, all torn down
    m = READY.search(err)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"run {n} failed ({proc.returncode}): {err}")
    return (str(n), f"{float(m.group(1)):.1f}", f"{t_url:.1f}", f"{t_visible:.1f}", f"{teardown:.1f}",
            f"{m.group(2)}/{m.group(3)}"), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true", help="build the image afresh (else: the cached build's time)")
    ap.add_argument("--recipe", default="chromium", choices=("chromium", "firefox"))
    ap.add_argument("--arch", default="amd64", choices=("amd64", "arm64"))
    ap.add_argument("--product", type=Path, help="import this cached build directory instead of building")
    args = ap.parse_args()
    profile, page_timeout = args.recipe, 300
    if args.arch != "amd64":  # emulated: give the first page more time
        profile, page_timeout = f"{args.recipe}-{args.arch}", 900
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-browser-")))
        w = stack.enter_context(net_world(tmp / "w"))
        w.write_config(link="tap", dns="none")
        (w.root / "www-inet" / "bench.html").write_text(PAGE)
        env = w.env()
        # In the machine's own namespace: apt must reach the mirror (the world's host namespace cannot).
        build = _build(env, args.recipe, args.rebuild, args.arch, args.product)
        if profile != args.recipe:  # the built-in profile, on the other architecture's image
            pdir = w.root / "profiles"
            pdir.mkdir()
            text = (REPO / "src" / "dispo" / "builtin_profiles" / f"{args.recipe}.toml").read_text()
            text = re.sub(r'(?m)^image = .*$', f'image = "{profile}"', text)
            text = re.sub(r'(?m)^ready_timeout_s = .*$', "ready_timeout_s = 900", text)
            if args.recipe == "chromium":  # as guest/chromium-flags.sh has it, for a --product built before
                flag = '"--ipc-connection-timeout=120", '
                text = re.sub(r'(?m)^command = \["chromium", ', f'command = ["chromium", {flag}', text)
            (pdir / f"{profile}.toml").write_text(text)
            w.config.write_text(f'profiles_dir = "{pdir}"\n' + w.config.read_text())
        url = f"http://{INTERNET}:{INTERNET_PORT}/bench.html"
        rows = [_one(w, profile, url, i + 1, page_timeout=page_timeout)[0] for i in range(args.runs)]
        med = {k: round(median([float(row[j]) for row in rows]), 1)
               for j, k in ((1, "ssh_ready_s"), (2, "viewer_url_s"), (3, "page_visible_s"), (4, "teardown_s"))}
        rows.append(("median", *(f"{v:.1f}" for v in med.values()), rows[0][5]))
        print(f"image {profile}: build {build['build_s']} s ({'fresh' if args.rebuild else 'cached figure'}); "
              f"rootfs {build['rootfs_apparent_mib']} MiB ({build['rootfs_allocated_mib']} MiB allocated); "
              f"VMM/accelerator {rows[0][5]}")
        topic = "browser" if args.arch == "amd64" else f"browser-{args.arch}"
        report(topic, ("run", "ssh_ready_s", "viewer_url_s", "page_visible_s", "teardown_s", "vmm/accel"), rows,
               {"build": build, "median": med, "runs": args.runs,
                "what": f"dispo run {profile} --display web URL; times from dispo run; page visible = the host's "
                        f"Playwright sees the page's colour through the viewer"})


if __name__ == "__main__":
    main()
