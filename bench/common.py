"""Shared bits for benchmarks: the median, a results table, the JSON artifact."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def report(topic: str, header: tuple[str, ...], rows: list[tuple[Any, ...]], extra: dict[str, Any]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / f"bench-{topic}.json"
    out.write_text(json.dumps({"header": header, "rows": rows, **extra}, indent=1, default=str) + "\n")
    print(f"results: {out}")
