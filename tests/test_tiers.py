"""Tiers follow from the worlds a test uses (tests/tiers.py): a test that boots a guest through an imported world
fixture is a VM test without a marker of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Collects the given paths in a pytest of its own and prints each test's tier marker, as conftest set it.
_COLLECT = """
import json, sys, pytest
from tests.tiers import TIERS, marker
found = {}
class Tiers:
    def pytest_collection_finish(self, session):
        for item in session.items:
            found[item.name.split("[")[0]] = sorted(t for t in TIERS if item.get_closest_marker(marker(t)))
pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Tiers()])
print("TIERS=" + json.dumps(found))
"""

CASES = {
    # unmarked modules whose tests boot guests through the worlds conftest shares (tests/guests.py)
    "tests/test_open.py": ("test_xdg_open_starts_a_disposable_session_on_the_url", "vm"),
    "tests/test_browser_features.py": ("test_browser_features_and_kept_volume", "browser"),
    # a fixture of conftest's (loop-mounted filesystems) makes a test a root test
    "tests/test_storage.py": ("test_probe_picks_the_best_backend", "root"),
    "tests/test_profiles.py": ("test_builtin_profiles_are_valid", "fast"),
}


def test_a_tests_tier_follows_from_its_worlds() -> None:
    p = subprocess.run([sys.executable, "-c", _COLLECT, *CASES], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=False, stdin=subprocess.DEVNULL)
    line = next((x for x in p.stdout.splitlines() if x.startswith("TIERS=")), None)
    assert line is not None, p.stdout + p.stderr
    found = json.loads(line.removeprefix("TIERS="))
    assert {test: found.get(test) for test, _ in CASES.values()} == {test: [tier] for test, tier in CASES.values()}
