"""The package's shape (ARCHITECTURE.md): layers, no import cycles, small modules, each one documented.

The import graph is read from the source with ``ast``, nothing is imported. An import at module
level (including inside ``if``/``try`` blocks and class bodies) runs when its module is imported;
one inside a function runs when the function is called (a *lazy* import, used for heavy or
optional backends) and cannot make an import cycle. ``if TYPE_CHECKING:`` blocks never run.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nofree"

#: The layers, lowest first: a module may import (lazily or not) modules of its own layer and of
#: the layers below it, never above. The longest matching name decides a module's layer.
LAYERS = [
    ("core", ["nofree", "nofree.core", "nofree._lazy"]),
    ("plumbing", ["nofree.artifacts", "nofree.hub", "nofree.cache", "nofree.kernels", "nofree.data",
                  "nofree.eval"]),
    ("frozen models", ["nofree.encoders", "nofree.lm", "nofree.registry"]),
    ("composition", ["nofree.anchors", "nofree.decoding", "nofree.scoring", "nofree.adapters"]),
    ("captioning", ["nofree.captioning", "nofree.captioners"]),
    ("applications", ["nofree.eval.report", "nofree.eval.inputs", "nofree.demo", "nofree.sharing"]),
    ("front ends", ["nofree.cli", "nofree.cli_options", "nofree.cli_output", "nofree.cli_anchors",
                    "nofree.cli_cache", "nofree.cli_hub", "nofree.cli_train", "nofree.testing"]),
]

#: Imports that point up a layer, each with the reason it is tolerated.
UPWARD_EXCEPTIONS = {
    ("nofree.adapters.smallcap", "nofree.captioning.retrieval"):
        "SmallCap retrieves its in-context captions with RetrievalCaptioner (lazily); "
        "nofree.captioning.retrieval itself imports nothing above the composition layer",
}

#: Cycles closed by a lazy import (module level one way, inside a function the other), each
#: tolerated with its reason. A cycle of module-level imports only is never tolerated.
LAZY_CYCLE_EXCEPTIONS = {
    frozenset({"nofree.data.images", "nofree.data.webdataset"}):
        "load_image reads a webdataset member (SHARD.tar#MEMBER) through webdataset.read_member, "
        "imported only when it is given one; the webdataset reader decodes members with data.images",
    # Known, and being removed by the rework of anchors/ (asif, index, pipeline): delete this
    # entry when the cycle is gone (the test then says so).
    frozenset({"nofree.anchors.anchor_set", "nofree.anchors.search.index"}):
        "AnchorSet checks the optional faiss index entry of its manifest with "
        "index.check_index_entry (lazily); index reads and writes anchor sets",
}

MAX_LINES = 600
#: Modules allowed over MAX_LINES, each with the reason.
LONG_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module and whether it is lazy (inside a function)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, lazy))
            return
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: dict) -> set[str]:
    """The package's modules an import statement in module ``name`` loads."""
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[:len(here) - node.level + 1]
            base = ".".join(here + ([base] if base else []))
        wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = set()
    for target in wanted:
        if target != "nofree" and not target.startswith("nofree."):
            continue
        while target not in modules:  # an attribute of a module, e.g. `import nofree.x.y` of a name
            target = target.rsplit(".", 1)[0]
        if target != name:
            out.add(target)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(eager, lazy)``: for each module, the package modules it imports at module level and
    those it imports only inside functions."""
    modules = _modules()
    eager: dict[str, set[str]] = defaultdict(set)
    lazy: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node, is_lazy in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            (lazy if is_lazy else eager)[name] |= _targets(node, name, path.name == "__init__.py", modules)
    return eager, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {t for targets in graph.values() for t in targets}):
        if node not in index:
            connect(node)
    return found


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest layer name matching ``module``."""
    best, length = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > length:
                best, length = i, len(name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py"
    return best


def test_no_import_cycles_at_module_level():
    eager, _ = import_graph()
    found = cycles(eager)
    assert not found, "import cycles (module level): " + "; ".join(" <-> ".join(c) for c in found)


def test_lazy_imports_close_no_cycle_but_the_documented_ones():
    eager, lazy = import_graph()
    both = {name: eager.get(name, set()) | lazy.get(name, set()) for name in set(eager) | set(lazy)}
    found = [frozenset(c) for c in cycles(both)]
    new = [sorted(c) for c in found if c not in LAZY_CYCLE_EXCEPTIONS]
    assert not new, "import cycles through lazy imports: " + "; ".join(" <-> ".join(c) for c in new)
    gone = [sorted(c) for c in LAZY_CYCLE_EXCEPTIONS if c not in found]
    assert not gone, f"remove from LAZY_CYCLE_EXCEPTIONS, these cycles are gone: {gone}"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    eager, lazy = import_graph()
    upward = []
    for graph, kind in ((eager, "imports"), (lazy, "imports lazily")):
        for module, targets in sorted(graph.items()):
            for target in sorted(targets):
                if layer_of(target) > layer_of(module) and (module, target) not in UPWARD_EXCEPTIONS:
                    upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) {kind} {target} "
                                  f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)
    stale = [pair for pair in UPWARD_EXCEPTIONS
             if pair[1] not in eager.get(pair[0], set()) | lazy.get(pair[0], set())]
    assert not stale, f"remove these from UPWARD_EXCEPTIONS, the imports are gone: {stale}"


def test_core_imports_nothing_else_from_nofree():
    eager, lazy = import_graph()
    assert not eager.get("nofree.core") and not lazy.get("nofree.core")


def test_no_module_is_too_long():
    too_long, stale = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and name not in LONG_MODULES:
            too_long.append(f"{name} ({lines} lines)")
        if lines <= MAX_LINES and name in LONG_MODULES:
            stale.append(name)
    assert not too_long, f"modules over {MAX_LINES} lines: {', '.join(too_long)}: split them by concept"
    assert not stale, f"remove from LONG_MODULES, they are short enough now: {stale}"


def test_every_module_says_what_it_is_for():
    missing = [path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob("*.py"))
               if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"
