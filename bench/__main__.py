"""List the benchmarks."""

import pkgutil
from pathlib import Path

names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name not in ("common", "report")]
print("benchmarks (run one with: scripts/dev bench TOPIC):", ", ".join(names))
print("docs/performance.md from their JSON: scripts/dev bench report [--collect]")
