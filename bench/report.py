"""docs/performance.md and its charts, from the benchmarks' JSON: one command, no plotting library.

    .venv/bin/python -m bench.report [--collect]      (or: scripts/dev bench report [--collect])

Inputs, in docs/perf/data/:
  bench-warm.json, bench-memory.json, bench-net-compare.json, bench-firecracker.json
      what bench/warm.py, bench/memory.py, bench/net.py (--baseline) and bench/firecracker.py wrote to artifacts/;
      `--collect` copies the ones present in artifacts/ here first (the figures of the last run are kept in git,
      so the page can be regenerated anywhere).
  recorded.json
      figures that exist only in a closing note (an earlier machine or run), each with where it comes from;
      a figure a bench JSON has is taken from the JSON instead.
Outputs: docs/performance.md and docs/perf/*.svg (hand-written SVG: bars with their values, nothing else).
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PERF = DOCS / "perf"
DATA = PERF / "data"
ARTIFACTS = REPO / "artifacts"
TOPICS = ("warm", "memory", "net-compare", "firecracker")
COLOURS = {"cold": "#8c8c8c", "restored": "#2f7ed8", "pooled": "#2ca02c", "baseline": "#8c8c8c",
           "this tree": "#2f7ed8", "kernel": "#d62728", "PSS per clone": "#2f7ed8", "RSS per clone": "#8c8c8c",
           "PSS without TCG cache": "#2ca02c"}


def load(name: str) -> dict[str, Any] | None:
    path = DATA / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# -- SVG ------------------------------------------------------------------------------------------------------------
def bar_chart(title: str, unit: str, groups: list[tuple[str, list[tuple[str, float]]]], *,
              width: int = 720) -> str:
    """Horizontal grouped bars: one block per group, one bar per (series, value), each labelled with its value."""
    bar_h, gap, left, right, top = 16, 10, 230, 90, 34
    rows = sum(len(bars) for _, bars in groups)
    height = top + rows * (bar_h + 2) + len(groups) * (gap + 16) + 10
    peak = max((v for _, bars in groups for _, v in bars), default=1.0) or 1.0
    scale = (width - left - right) / peak
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    y = top
    for group, bars in groups:
        out.append(f'<text x="10" y="{y + 12}" font-weight="bold">{html.escape(group)}</text>')
        y += 16
        for series, value in bars:
            w = max(1.0, value * scale)
            colour = COLOURS.get(series.split(" (")[0], "#2f7ed8")
            out.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" text-anchor="end">{html.escape(series)}</text>')
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}">{_num(value)} {html.escape(unit)}</text>')
            y += bar_h + 2
        y += gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


# -- figures --------------------------------------------------------------------------------------------------------
def start_figures(rec: dict[str, Any]) -> tuple[dict[str, dict[str, float]], str]:
    """workload -> {cold, restored, pooled} seconds, and where they come from."""
    warm = load("bench-warm")
    if warm is not None and warm.get("minimal"):
        med = warm["minimal"]["median"]
        out = {"minimal `-- true`, ready": {"cold": med["cold"][0], "restored": med["restore"][0],
                                            "pooled": med["pool"][0]},
               "minimal `-- true`, ended": {"cold": med["cold"][1], "restored": med["restore"][1],
                                            "pooled": med["pool"][1]}}
        if warm.get("chromium"):
            c = warm["chromium"]["median"]
            out["chromium, page visible"] = {"cold": c["cold"], "restored": c["restore"], "pooled": c["pool"]}
        else:
            out["chromium, page visible"] = rec["warm_start"]["chromium, page visible"]
        return out, "docs/perf/data/bench-warm.json (chromium from recorded.json when the run skipped it)"
    return {k: v for k, v in rec["warm_start"].items() if not k.startswith("_")}, rec["warm_start"]["_source"]


def chromium_parts_lines() -> list[str]:
    """When a Chromium session's viewer URL came, its display showed in the viewer, and the page showed."""
    warm = load("bench-warm")
    chromium = (warm or {}).get("chromium") or {}
    parts, seen = chromium.get("parts_median_s"), chromium.get("median")
    if not parts or not seen:
        return []
    names = {"cold": "cold", "restore": "restored", "pool": "pooled"}
    lines = ["Where a Chromium start's time goes (seconds from the start request): the viewer's URL (the guest "
             "answered and its display is forwarded), the display shown in the viewer (the VNC connection's first "
             "frame), the page's colour shown.", "",
             "| start | viewer URL | display shown | page visible |", "|---|---|---|---|"]
    for how, per in parts.items():
        lines.append(f"| {names.get(how, how)} | {per.get('viewer_url', 0.0):.2f} s | "
                     f"{per.get('display_shown', 0.0):.2f} s | {seen.get(how, 0.0):.2f} s |")
    return [*lines, ""]


def step_figures(rec: dict[str, Any]) -> tuple[dict[str, dict[str, float]], str]:
    warm = load("bench-warm")
    if warm is not None and warm.get("minimal", {}).get("steps_median_s"):
        steps = warm["minimal"]["steps_median_s"]
        names = {"cold": "cold", "restore": "restored", "pool": "pooled"}
        return ({names.get(k, k): v for k, v in steps.items()}, "docs/perf/data/bench-warm.json")
    return {k: v for k, v in rec["steps"].items() if not k.startswith("_")}, rec["steps"]["_source"]


MemRow = tuple[str, int, float, float, float, float, float]  # template, clones, PSS each, RSS each, PSS sum,
#                                                              guest RAM PSS sum, TCG translation cache sum (MiB)


def memory_figures(rec: dict[str, Any]) -> tuple[list[MemRow], str, str]:
    """Per template and clone count: mean PSS and RSS per clone, the PSS sum, and the sums of its two big parts
    (the guest's RAM mapping, TCG's translation cache); the teardown figure."""
    mem = load("bench-memory")
    if mem is not None and (mem.get("minimal") or mem.get("chromium")):
        rows: list[MemRow] = []
        for template in ("minimal", "chromium"):
            for r in mem.get(template) or []:
                each = r["per_clone"]
                rows.append((template, int(r["clones"]), statistics.mean(r["pss_mib"]), statistics.mean(r["rss_mib"]),
                             float(r["pss_sum_mib"]), sum(float(p.get("guest_ram_pss", 0.0)) for p in each),
                             sum(float(p.get("tcg_cache_rss", 0.0)) for p in each)))
        teardown = f"{mem['teardown']['median_s']:.3f} s" if mem.get("teardown") else "-"
        return rows, "docs/perf/data/bench-memory.json", teardown
    r = rec["memory"]
    return ([("minimal", int(c), float(p), float(s), float(p) * int(c), 0.0, 0.0) for c, p, s in r["minimal"]],
            r["_source"], r.get("teardown", "-"))


def memory_lines(rows: list[MemRow], src: str, teardown: str) -> list[str]:
    """The memory table, and the ratio of N clones to one, with and without TCG's cache (no KVM host has it)."""
    lines = ["| template | clones alive | PSS per clone | RSS per clone | PSS of all clones | of it: guest RAM "
             "| of it: TCG code cache | PSS of all without the TCG cache |", "|---|---|---|---|---|---|---|---|"]
    one: dict[str, MemRow] = {}
    ratios: list[str] = []
    for row in rows:
        template, n, pss, rss, total, ram, tcg = row
        lines.append(f"| {template} | {n} | {pss:.0f} MiB | {rss:.0f} MiB | {total:.0f} MiB | {ram:.0f} MiB | "
                     f"{tcg:.0f} MiB | {total - tcg:.0f} MiB |")
        if n == 1:
            one[template] = row
        elif template in one and one[template][4] > 0:
            base = one[template]
            ratios.append(f"- {template}, {n} clones against one: PSS of all {total / base[4]:.2f}x; without TCG's "
                          f"cache {(total - tcg) / max(base[4] - base[6], 1.0):.2f}x; the guest's RAM alone "
                          f"{ram / max(base[5], 1.0):.2f}x.")
    return [*lines, "", *ratios, "",
            "PSS counts a page shared by k processes as 1/k to each, so the PSS sum is what the clones hold together. "
            "The guest's RAM is the template's sealed memfd mapped privately (copy on write); TCG's code cache is "
            "each emulator's translated guest code, private to it and absent under KVM. "
            f"Teardown of a restored minimal session: {teardown}. Source: {src}.", ""]


def write(collect: bool) -> list[Path]:
    if collect:
        DATA.mkdir(parents=True, exist_ok=True)
        for topic in TOPICS:
            src = ARTIFACTS / f"bench-{topic}.json"
            if src.exists():
                shutil.copyfile(src, DATA / src.name)
    rec: dict[str, Any] = json.loads((DATA / "recorded.json").read_text())
    written: list[Path] = []

    def svg(name: str, text: str) -> str:
        path = PERF / name
        path.write_text(text)
        written.append(path)
        return f"perf/{name}"

    starts, starts_src = start_figures(rec)
    start_svg = svg("start-times.svg", bar_chart("Start times: cold boot, restored from a template, pooled", "s",
                                                 [(k.replace("`", ""), [(h, v[h]) for h in ("cold", "restored",
                                                                                           "pooled")])
                                                  for k, v in starts.items()]))
    steps, steps_src = step_figures(rec)
    step_svg = svg("steps.svg", bar_chart("Step times of one start of minimal `-- true` (median)".replace("`", ""),
                                          "s", [(how, sorted(((k, float(v)) for k, v in per.items() if v >= 0.005),
                                                             key=lambda kv: -kv[1]))
                                                for how, per in steps.items()]))
    mem_rows, mem_src, teardown = memory_figures(rec)
    mem_svg = svg("memory.svg", bar_chart("Memory of restored clones (VMM, MiB per clone)", "MiB",
                                          [(f"{t}, {n} clone{'s' if n > 1 else ''} alive",
                                            [("PSS per clone", p), ("RSS per clone", r),
                                             ("PSS without TCG cache", p - tcg / n)])
                                           for t, n, p, r, _, _, tcg in mem_rows]))

    lines = ["# Performance", "",
             "Generated by `python -m bench.report` (`scripts/dev bench report`) from the benchmarks' JSON in",
             "`docs/perf/data/`; do not edit by hand. Rerun a benchmark (it writes `artifacts/bench-*.json`), then",
             "`python -m bench.report --collect` to take its figures in. All figures are medians; guests run under",
             "QEMU/TCG on a 2-core host unless said otherwise, so absolute seconds are slow and the ratios matter.", "",
             "## Start: cold, restored, pooled", "", f"![start times]({start_svg})", "",
             "| workload | cold | restored (ratio) | pooled (ratio) |", "|---|---|---|---|"]
    for k, v in starts.items():
        c = v["cold"]
        lines.append(f"| {k} | {c:.2f} s | {v['restored']:.2f} s ({v['restored'] / c:.3f}) | "
                     f"{v['pooled']:.2f} s ({v['pooled'] / c:.3f}) |")
    lines += ["", f"Source: {starts_src}.", "", *chromium_parts_lines(), "## Where one start spends its time", "",
              f"![steps]({step_svg})", "",
              "| start | step | seconds |", "|---|---|---|"]
    for how, per in steps.items():
        for step, secs in sorted(per.items(), key=lambda kv: -float(kv[1])):
            if float(secs) >= 0.005:
                lines.append(f"| {how} | {step} | {float(secs):.2f} |")
    lines += ["", f"Source: {steps_src}.", "", "## Memory per clone against the number of clones", "",
              f"![memory]({mem_svg})", "", *memory_lines(mem_rows, mem_src, teardown)]

    lines += _net_section(rec, svg)
    lines += _firecracker_section(rec, svg)
    lines += ["## Figures from closing notes", "",
              "Recorded by earlier runs (other machines or loads) and kept for comparison; `recorded.json`.", "",
              "| figure | value | source |", "|---|---|---|"]
    for item in rec["notes"]:
        lines.append(f"| {item['figure']} | {item['value']} | {item['source']} |")
    page = DOCS / "performance.md"
    page.write_text("\n".join(lines) + "\n")
    written.append(page)
    return written


def _net_section(rec: dict[str, Any], svg: Any) -> list[str]:
    cmp_ = load("bench-net-compare")
    lines = ["## Host side: a session's network", ""]
    if cmp_ is None:
        return [*lines, f"No network comparison yet; {rec['net']['text']}", ""]
    base, new = cmp_["samples_s"]["baseline"], cmp_["samples_s"]["this_tree"]

    def med(xs: list[float]) -> float:
        return statistics.median(xs) * 1000

    n = cmp_.get("background", 50)
    groups = [(f"create, {n} sessions up", [("baseline", med(base["loaded_create"])),
                                            ("this tree", med(new["loaded_create"]))]),
              (f"delete, {n} sessions up", [("baseline", med(base["loaded_delete"])),
                                            ("this tree", med(new["loaded_delete"]))]),
              ("the kernel alone: a bare tap", [("kernel (make)", med(new["kernel_create"])),
                                                ("kernel (delete)", med(new["kernel_delete"]))])]
    path = svg("net.svg", bar_chart("Network of one session: create and delete (median)", "ms", groups))
    lines += [f"![network]({path})", "",
              "| step | before (baseline checkout) | after | ratio |", "|---|---|---|---|"]
    for what, key in (("create", "loaded_create"), ("delete", "loaded_delete")):
        b, a = med(base[key]), med(new[key])
        lines.append(f"| {what}, {n} sessions up | {b:.1f} ms | {a:.1f} ms | {a / b:.2f} |")
    lines.append(f"| kernel floor (bare tap make / delete) | | {med(new['kernel_create']):.1f} / "
                 f"{med(new['kernel_delete']):.1f} ms | |")
    lines += ["", f"Both measured in one run of `bench/net.py --baseline {cmp_.get('baseline')}` "
              f"({cmp_.get('rounds')} alternating rounds each). {rec['net']['text']}", ""]
    return lines


def _firecracker_section(rec: dict[str, Any], svg: Any) -> list[str]:
    fc = load("bench-firecracker")
    lines = ["## Firecracker's host side", ""]
    if fc is None:
        return [*lines, rec["firecracker"]["text"], ""]
    header = fc.get("header", ["step", "median ms", "min ms", "max ms", "runs"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in fc["rows"]:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return [*lines, "", "\"raw\" is the same binary driven directly (spawn, socket, the same configuration, "
                        "InstanceStart; or snapshot/load), alternating with dispo's run for run; \"baseline\" rows "
                        f"are the checkout {fc.get('baseline')} measured in the same run. Source: "
                        "docs/perf/data/bench-firecracker.json (bench/firecracker.py, the tiny ELF guest under KVM).",
                    ""]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("--collect", action="store_true", help="copy artifacts/bench-*.json into docs/perf/data first")
    args = ap.parse_args()
    PERF.mkdir(parents=True, exist_ok=True)
    for path in write(args.collect):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
