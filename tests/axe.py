"""axe-core (from npm: scripts/dev installs it into .cache/axe, never committed) run in a Playwright page: the
page's serious and critical accessibility violations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playwright.sync_api import Page

REPO = Path(__file__).resolve().parent.parent
AXE = REPO / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
SEVERE = ("serious", "critical")


def violations(page: Page, *, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run axe on the page as it is now (injected through the DevTools protocol, so the page's CSP stays as it
    is): each serious or critical violation, with the first few elements it found it on. `exclude`: CSS
    selectors of parts that are not ours (noVNC's frame)."""
    assert AXE.is_file(), f"axe-core is not installed ({AXE}): run 'scripts/dev setup' (npm install into .cache/axe)"
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate("""exclude => axe.run({include: [document], exclude: exclude.map(s => [s])},
                                                   {resultTypes: ['violations'], iframes: false})""", list(exclude))
    assert result["testEngine"]["name"] == "axe-core" and result["passes"], "axe ran no rule"
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [(n["target"], n.get("failureSummary", "")) for n in v["nodes"][:5]]}
            for v in result["violations"] if v["impact"] in SEVERE]
