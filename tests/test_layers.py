"""The layers of dispo's code, held against its imports: no import circles, and no import that runs up a layer.

Every module under src/dispo is parsed (not imported) and every `import` in it counts, wherever it stands: at
the top, inside a function, or under `if TYPE_CHECKING:` (a type a module names is a thing it knows about).
`from dispo.x import y` is an import of the module dispo.x.y when there is one, else of dispo.x. Importing
dispo.x.y also runs dispo/x/__init__.py, but that is not counted as an import of the package: a package's
__init__ that imports its own modules would otherwise make a circle of every package.

Not seen here: a module loaded by name at run time (importlib), which is how infra/undo.py finds the undoers
of the layers above it, and how dispod loads `--machinery MODULE:NAME`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"

# The layers, lowest first: a module may import its own layer's modules (without a circle) and the layers below
# it, never one above. Each entry is a module or a package (with everything in it); "dispo" is the root
# package's own __init__ alone (its version). A module that no entry names fails the test below, so a new one
# is placed here on purpose.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("infrastructure", (
        "dispo", "dispo.errors", "dispo.settings", "dispo.names", "dispo.config", "dispo.features",
        "dispo.privacy", "dispo.arch", "dispo.guest", "dispo.infra", "dispo.servicepaths",
    )),
    ("storage/net/vmm", (
        "dispo.storage", "dispo.net", "dispo.vmm", "dispo.kernels", "dispo.ssh", "dispo.fetch", "dispo.imagebuild",
        "dispo.profiles", "dispo.receipt", "dispo.verify", "dispo.gc",
    )),
    ("runtime", ("dispo.runtime",)),
    ("web/daemon", ("dispo.web", "dispo.daemon", "dispo.client", "dispo.sdk", "dispo.cluster")),
    ("cli", ("dispo.cli", "dispo.__main__", "dispo.pytest_plugin")),
)
LAYER_NAMES = tuple(name for name, _ in LAYERS)
# The one import allowed up the layers: the root package names the SDK (`dispo.connect`, `dispo.AsyncClient`,
# for type checkers too) and loads it only when a program first uses one of them (its module __getattr__), so
# `import dispo` runs none of it (test_sdk.py checks that it loads no HTTP library).
LAZY_EXPORTS = {("dispo", "dispo.sdk")}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line})"


def modules() -> dict[str, Path]:
    """Every module under src/dispo by its dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted((SRC / "dispo").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    """The imports of dispo modules in one module, each once per line, wherever they stand in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def nearest(dotted: str) -> str:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dispo":
                    yield Import(name, nearest(alias.name), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level-1 packages
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            if base.split(".")[0] != "dispo":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield Import(name, full if full in known else nearest(base), node.lineno)


def graph() -> tuple[dict[str, Path], list[Import]]:
    known = modules()
    edges = {(i.importer, i.imported, i.line): i for name, path in known.items()
             for i in imports(name, path, known) if i.imported != name}
    return known, list(edges.values())


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, entries in LAYERS:
        for entry in entries:
            covers = module == entry or (entry != "dispo" and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = layer, len(entry)
    return best


def circles(nodes: list[str], edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, largest first."""
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for e in edges:
        succ[e.importer].add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return sorted(found, key=lambda c: (-len(c), c))


def test_the_graph_is_read() -> None:
    """The reader finds what it must, or the tests below would pass on an empty graph."""
    known, edges = graph()
    pairs = {(e.importer, e.imported) for e in edges}
    assert {"dispo", "dispo.runtime", "dispo.runtime.live", "dispo.web.viewer", "dispo.cli.run"} <= set(known)
    assert ("dispo.runtime", "dispo.runtime.live") in pairs           # from dispo.runtime.live import ...
    assert ("dispo.runtime", "dispo.runtime.plan") in pairs           # from dispo.runtime import plan as planning
    assert ("dispo.web.viewers", "dispo.runtime.live") in pairs       # under TYPE_CHECKING
    assert ("dispo.client", "dispo.runtime.guestio") in pairs         # inside a function
    assert ("dispo.runtime.live", "dispo.receipt") in pairs           # from dispo import receipt
    assert circles(["a", "b", "c", "d"], [Import("a", "b", 1), Import("b", "c", 1), Import("c", "a", 1),
                                          Import("c", "d", 1)]) == [["a", "b", "c"]]


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in modules() if layer_of(m) is None)
    assert not unplaced, ("no layer for " + ", ".join(unplaced) + "; add each to LAYERS in tests/test_layers.py, "
                          "in the lowest layer whose modules are all it imports")


def test_no_import_circles() -> None:
    known, edges = graph()
    found = circles(list(known), edges)
    lines = []
    for n, component in enumerate(found, 1):
        inside = set(component)
        lines.append(f"circle {n}: {len(component)} modules: {', '.join(component)}")
        lines += [f"    {e}" for e in sorted(edges, key=lambda e: (e.importer, e.imported, e.line))
                  if e.importer in inside and e.imported in inside]
    assert not found, "import circles (each import that ties one is listed):\n" + "\n".join(lines)


def test_no_import_runs_up_a_layer() -> None:
    _, edges = graph()
    rank = {name: i for i, name in enumerate(LAYER_NAMES)}
    upward = []
    for e in sorted(edges, key=lambda e: (e.importer, e.imported, e.line)):
        low, high = layer_of(e.importer), layer_of(e.imported)
        if (e.importer, e.imported) in LAZY_EXPORTS:
            continue
        if low is not None and high is not None and rank[high] > rank[low]:
            upward.append(f"    {e}: {low} imports {high}")
    assert not upward, (f"imports that run up a layer (layers, lowest first: {' < '.join(LAYER_NAMES)}):\n"
                        + "\n".join(upward))


# Run in a fresh interpreter: the test process has loaded aiohttp long before (other tests, pytest's plugins).
NO_WEB_SERVER = """
    import sys
    from pathlib import Path

    import dispo.runtime
    assert "aiohttp" not in sys.modules, "import dispo.runtime loaded aiohttp"

    from tests import fakes
    assert "aiohttp" not in sys.modules, "tests.fakes loaded aiohttp (the check below would mean nothing)"
    from dispo.runtime import EventKind, Runtime, build

    cfg = fakes.config(Path(sys.argv[1]))
    rt = Runtime(cfg, machinery=fakes.machinery())
    command = rt.start(build(cfg, command=["sh", "-c", "echo hello"]))
    assert command.wait(60), command.status()
    assert command.exit_status == 0 and command.error is None, command.status()
    # A web display with no viewer host: its app runs on the guest's display and nothing serves it.
    seen = []
    display = rt.start(build(cfg, profile="chromium", url="http://example.test/"), sink=seen.append)
    while display.state.value == "starting" and not display.ended:
        display.wait(0.05)
    assert display.state.value == "running", display.status()
    rt.stop(display.id, "test over")
    assert display.wait(60) and display.error is None, display.status()
    assert not [e for e in seen if e.kind is EventKind.VIEWER]
    loaded = sorted(m for m in sys.modules
                    if m == "aiohttp" or m.startswith(("aiohttp.", "dispo.web", "dispo.daemon", "dispo.cli")))
    assert not loaded, f"running sessions loaded {loaded}"
    print("ok")
"""


def test_running_a_session_never_loads_the_web_server(tmp_path: Path) -> None:
    """The runtime runs sessions without aiohttp (or any of dispo's web, daemon or CLI code) in the process:
    `import dispo.runtime`, then a command session and a web display session on the fakes, to their end."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_WEB_SERVER), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


# A single host needs none of the cluster's code: Ray (the `cluster` extra) is imported by dispo/cluster/ alone,
# and only when dispod runs with --ray or --gateway.
NO_RAY = """
    import sys
    from pathlib import Path

    from dispo.cli import main as cli
    from dispo.daemon import dispod, main as daemon
    from dispo.web import app

    assert cli.build_parser().parse_args(["ls"]).command == "ls"
    assert daemon.build_parser().parse_args(["--listen", "127.0.0.1:0"]).ray is None
    from tests import fakes
    cfg = fakes.config(Path(sys.argv[1]))
    d = dispod.Dispod(cfg, dispod.options_from(cfg, machinery=fakes.machinery()))
    d.open()
    try:
        app.build_app(d.service, d.options.limits)
    finally:
        d.close()
    loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "dispo.cluster")))
    assert not loaded, f"a single host loaded {loaded}"
    print("ok")
"""


def test_a_single_host_never_loads_ray(tmp_path: Path) -> None:
    """`dispo` and `dispod` without --ray load neither Ray nor dispo/cluster/: a host without the extra works."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_RAY), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
