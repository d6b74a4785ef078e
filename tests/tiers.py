"""Test tiers, by what a test pays for: a test's tier follows from the worlds (fixtures) it uses and from the
markers of its module, never from a list kept by hand.

- fast: no root, no VM (runs anywhere, in parallel: `scripts/dev test fast`)
- root: namespaces, loop filesystems, nftables, fake guests
- vm: real guests from the minimal image, or a real VMM
- browser: Chromium or Firefox guests, and arm64 guests

A fixture that builds such a world says so with `@tier("vm")` under its `@pytest.fixture`; every test that uses
it, directly or through another fixture, is in that tier (or a costlier one).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

TIERS = ("fast", "root", "vm", "browser")  # cheapest first: the order CI runs them in
_F = TypeVar("_F", bound=Callable[..., object])
_ATTR = "_dispo_tier"


def tier(name: str) -> Callable[[_F], _F]:
    """Put every test that uses the decorated fixture in tier `name` (or a costlier one)."""
    if name not in TIERS:
        raise ValueError(f"unknown tier {name!r}: one of {', '.join(TIERS)}")

    def mark(f: _F) -> _F:
        setattr(f, _ATTR, name)
        return f
    return mark


def marker(name: str) -> str:
    """The marker conftest gives each test of tier `name`, which `-m` selects on. Not the tier's own name:
    `root` and `vm` are also markers that modules put on their tests, and a `-m root` would select a VM test
    that carries both."""
    return f"tier_{name}"


def tier_of(item: pytest.Item) -> str:
    """The costliest tier among the item's own markers and the fixtures it uses (transitively)."""
    found = {m.name for m in item.iter_markers() if m.name in TIERS}
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        if defs and (name := getattr(defs[-1].func, _ATTR, None)):
            found.add(name)
    return max(found, key=TIERS.index, default="fast")


# -- running the tiers (scripts/dev test) --------------------------------------------------------------------
# What each tier may take on the 2-core CI machine with a warm image cache; a tier over it is named at the end
# (the machine is noisy, so it is a note for people, not a failure). Together under 25 minutes with lint and the
# images (issue 21): 1571 s in the CI run of b83c6d9 with root serial and vm on 2 workers, the browser
# tier 823 s (the quiet tests staggered in one test, the dashboard's session a template clone).
BUDGET_S = {"fast": 150, "root": 150, "vm": 420, "browser": 900}
# pytest-xdist workers (tests share no namespace, state dir or workspace). The fast tier's tests wait on fake
# guests, dispod and headless pages more than they compute: 3 workers on this 2-core machine took 108-116 s
# against 130-149 s with 2. The root tier's tests wait on the kernel, nft and their own fake guests: 80 s on 2
# workers against 155 s serial. The vm tier's minimal guests (one vCPU each) and the cluster e2e's waits for
# Ray and for a lost node leave room for a third worker: 330 s against 403 s on 2. The browser tier stays serial:
# two browser guests booting at once (2 vCPUs each) slowed each other past the tests' deadlines.
PARALLEL = {"fast": "3", "root": "2", "vm": "3"}


def _counts(junit: Path) -> dict[str, int]:
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    try:
        root = ET.parse(junit).getroot()  # noqa: S314 (written by our own pytest run, not hostile)
    except (OSError, ET.ParseError):
        return out
    for suite in root.iter("testsuite"):
        tests, failures, errors, skipped = (int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped"))
        out["failed"] += failures
        out["errors"] += errors
        out["skipped"] += skipped
        out["passed"] += tests - failures - errors - skipped
    return out


def main(argv: list[str]) -> int:
    """`python -m tests.tiers [TIER ...] [-- PYTEST-ARGS]`: each tier (all of them, cheapest first, by default)
    as its own pytest run, then each tier's time and counts and the whole run's closing line."""
    names = [a for a in argv if a in TIERS]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    if unknown := [a for a in argv[: argv.index("--") if "--" in argv else len(argv)] if a not in TIERS]:
        print(f"tests.tiers: unknown tier {unknown[0]!r} (hint: one of {', '.join(TIERS)}, then -- and pytest's "
              "arguments)", file=sys.stderr)
        return 2
    rows: list[tuple[str, float, dict[str, int], int]] = []
    with tempfile.TemporaryDirectory(prefix="dispo-tiers-") as tmp:
        for name in names or list(TIERS):
            junit = Path(tmp) / f"{name}.xml"
            cmd = [sys.executable, "-m", "pytest", "-m", marker(name), "--durations=10", f"--junitxml={junit}",
                   *extra]
            short = ""
            if name in PARALLEL:
                # xdist puts each worker's tmp_path under popen-gwN/; from a short base, a session's socket
                # paths (state dir of a test's tmp_path, then sessions/ID/NAME.sock) stay as short as in a run
                # without workers, under the 107 bytes of a unix socket address.
                short = tempfile.mkdtemp(prefix="dt-", dir="/tmp")
                # worksteal: an idle worker takes tests queued on the other, so one long test (the API fuzzer in
                # fast, a two-guest test in vm) does not end the tier alone on one core.
                cmd += ["-n", PARALLEL[name], "--dist", "worksteal", f"--basetemp={short}"]
            print(f"\n=== tier {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.monotonic()
            rc = subprocess.call(cmd)
            rows.append((name, time.monotonic() - t0, _counts(junit), rc))
            if short and rc in (0, 5):
                shutil.rmtree(short, ignore_errors=True)
            elif short:
                print(f"tests.tiers: the {name} tier's tmp paths are kept in {short}", flush=True)
    print("\n=== tiers")
    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    worst = 0
    for name, seconds, counts, rc in rows:
        over = f" (over its budget of {BUDGET_S[name]} s)" if seconds > BUDGET_S[name] else ""
        print(f"  {name:8} {seconds:7.1f} s  {counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['errors']} errors, {counts['skipped']} skipped  (pytest exit {rc}){over}")
        for k in total:
            total[k] += counts[k]
        worst = max(worst, 0 if rc == 5 else rc)  # 5: a tier with no test selected is not a failure
    print(f"  all      {sum(r[1] for r in rows):7.1f} s")
    print(f"tests: {total['passed']} passed, {total['failed'] + total['errors']} failed, {total['skipped']} skipped")
    return worst


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
