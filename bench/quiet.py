"""What the quiet browser costs (docs/quiet.md): `dispo run PROFILE --display web URL --log-requests` for the
built-in profile (quiet) and the same profile with `[privacy] quiet = false` (the browser as Debian ships it),
alternately, a few times each: time to the page visible in the viewer, and the requests the guest made beyond
the page's own (from dispo's --log-requests list).

The world's resolver is a DNS server in its "internet" netns that answers only the page's name: the vendors'
services get NXDOMAIN at once, which is the cheapest a loud browser can have it (on a real network they answer
and the browser talks to them). Runs as root inside namespaces it creates, never on the machine's network.

    .venv/bin/python -m bench.quiet [--runs 3] [--recipe chromium|firefox]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import tempfile
from pathlib import Path

from tests.netns import INTERNET, INTERNET_OTHER, INTERNET_PORT, PYTHON, REPO, in_ns, net_world

from bench.browser import PAGE, _build, _one
from bench.common import ARTIFACTS, median, report
from dispo import profiles

PAGE_HOST = "page.dispo.test"
MADE = re.compile(r"the guest made (\d+) request")
LISTED = re.compile(r"^  (dns|tcp|udp|icmp|ip|ipv6|other) (.*?)(?: x(\d+))?$", re.M)


def _others(err: str) -> int:
    """Requests in dispo's --log-requests list that are not the page's DNS lookup or its server."""
    n = 0
    for kind, what, times in LISTED.findall(err):
        page = (kind == "dns" and f" {PAGE_HOST} " in f" {what} ") or (kind == "tcp" and what.startswith(INTERNET))
        if not page:
            n += int(times or 1)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recipe", default="chromium", choices=("chromium", "firefox"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still tears its world down
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispo-bench-quiet-")))
        w = stack.enter_context(net_world(tmp / "w"))
        (w.root / "www-inet" / "bench.html").write_text(PAGE)
        w.spawn(["nsenter", f"--net=/run/netns/{w.internet}", PYTHON, "-m", "tests.logging_servers", "dns",
                 INTERNET_OTHER, w.root / "dns.log", f"{PAGE_HOST}={INTERNET}"], cwd=REPO)
        while f"{INTERNET_OTHER}:53" not in in_ns(w.internet, "ss", "-H", "-lnu").stdout:
            pass
        pdir = w.root / "profiles"
        pdir.mkdir()
        loud = f"{args.recipe}-loud"
        text = (profiles.BUILTIN_DIR / f"{args.recipe}.toml").read_text()
        (pdir / f"{loud}.toml").write_text(text + "\n[privacy]\nquiet = false\n")
        w.config.write_text(f'profiles_dir = "{pdir}"\n[net]\nlink = "tap"\ndns = "{INTERNET_OTHER}"\n')
        # In the machine's own namespace: apt must reach the mirror (the world's host namespace cannot).
        build = _build(w.env(), args.recipe, False)
        url = f"http://{PAGE_HOST}:{INTERNET_PORT}/bench.html"
        rows: list[tuple[str, ...]] = []
        for i in range(args.runs):
            for profile, mode in ((args.recipe, "quiet"), (loud, "as shipped")):
                row, err = _one(w, profile, url, i + 1, "--log-requests")
                made = MADE.search(err)
                rows.append((mode, row[0], row[1], row[3], made.group(1) if made else "?", str(_others(err)),
                             row[5]))
        med = {mode: {"page_visible_s": round(median([float(r[3]) for r in rows if r[0] == mode]), 1),
                      "requests": median([float(r[4]) for r in rows if r[0] == mode]),
                      "other_requests": median([float(r[5]) for r in rows if r[0] == mode])}
               for mode in ("quiet", "as shipped")}
        for mode, m in med.items():
            rows.append((f"median {mode}", "", "", f"{m['page_visible_s']:.1f}", f"{m['requests']:g}",
                         f"{m['other_requests']:g}", rows[0][6]))
        report(f"quiet-{args.recipe}",
               ("mode", "run", "ssh_ready_s", "page_visible_s", "requests", "not_the_page", "vmm/accel"), rows,
               {"median": med, "runs": args.runs, "recipe": args.recipe, "build": build,
                "cost_of_quiet_s": round(med["quiet"]["page_visible_s"] - med["as shipped"]["page_visible_s"], 1),
                "what": f"dispo run {args.recipe}|{loud} --display web URL --log-requests; page visible = the host's "
                        f"Playwright sees the page's colour through the viewer; requests from --log-requests"})


if __name__ == "__main__":
    main()
