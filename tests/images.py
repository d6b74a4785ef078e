"""The guest images the suite boots, built into the shared build cache ($DISPO_CACHE_DIR, default
/var/cache/dispo) before the tests run, so no test pays for a build and the tiers' times say what the tests cost.

    python -m tests.images            # minimal, chromium, firefox, minimal for arm64

Each is built only when its recipe or the host's apt sources changed (the cache key); a build holds the cache's
lock, so a test that needs the same image meanwhile waits for it instead of building it twice.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from dispo.errors import DispoError
from dispo.imagebuild import build_product, recipes
from tests.worlds import make_config

WANTED = [("minimal", "amd64"), ("chromium", "amd64"), ("firefox", "amd64"), ("minimal", "arm64")]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dispo-images-") as tmp:
        cfg = make_config(Path(tmp) / "ws", Path(tmp) / "state")  # the builds' journals; nothing is imported
        for name, arch in WANTED:
            t0 = time.monotonic()
            try:
                product = build_product(cfg, recipes.get(name, arch), quiet=True)
            except DispoError as e:
                print(f"tests.images: {name} ({arch}): {e.one_line()}", file=sys.stderr)
                return 1
            print(f"tests.images: {name} ({arch}) {product.path.name} in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
