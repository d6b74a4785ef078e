"""List the benchmarks."""

import pkgutil
from pathlib import Path

names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name not in ("common",)]
print("benchmarks (run one with: scripts/dev bench TOPIC):", ", ".join(names))
