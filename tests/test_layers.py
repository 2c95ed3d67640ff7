"""The package's layers, checked on the source (AST; nothing is imported).

Core (errors, types, _version, util, phi, organs) at the bottom; the stages (io, preprocess,
model, explain, report, train) above it; history beside them; pipeline over the stages; the
front ends (cli, ui) on top. See docs/architecture.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dicompipe"
STAGES = {"io", "preprocess", "model", "explain", "report", "train"}
FRONT = {"cli", "ui", "pacs", "batch", "pipeline", "__init__"}


def _components() -> set[str]:
    return {p.stem for p in PKG.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.stem != "__init__"}


def _module_name(f: Path) -> str:
    parts = f.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(f: Path) -> set[str]:
    """Every dicompipe module ``f`` imports, at the top or inside functions (full names;
    ``from dicompipe import x`` of something not a submodule is the package face, "dicompipe")."""
    comps = _components()
    mod = _module_name(f)
    pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "dicompipe"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base == "dicompipe":
                out |= {f"dicompipe.{a.name}" if a.name in comps else "dicompipe" for a in node.names}
            elif base.split(".")[0] == "dicompipe":
                out.add(base)
    return out


def _component(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    """component -> the other components it imports."""
    g: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        a = _component(_module_name(f))
        g.setdefault(a, set()).update(b for b in map(_component, _imports(f)) if b != a)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package():
    g = graph()
    assert STAGES <= set(g) and {"pipeline", "cli", "ui", "types"} <= set(g)
    assert "io" in g["pipeline"] and "report" in g["pipeline"]
    assert "pipeline" in g["pacs"] and "cli" not in g["pacs"] and "ui" not in g["pacs"]


def test_stages_never_import_front_ends():
    g = graph()
    bad = {s: sorted(g[s] & FRONT) for s in STAGES if g[s] & FRONT}
    assert not bad, f"stages importing cli/ui/pipeline/the package face: {bad}"


def test_io_is_the_first_stage():
    g = graph()
    assert not g["io"] & (STAGES | {"history"}), sorted(g["io"])


def test_inference_never_imports_training():
    g = graph()
    users = sorted(c for c, deps in g.items() if "train" in deps)
    assert users == ["cli"], f"only the CLI may reach the training package: {users}"


def test_core_imports_nothing_upward():
    g = graph()
    for leaf in ("errors", "_version", "util", "phi"):
        assert not g.get(leaf), f"{leaf} imports {sorted(g[leaf])}"
    # types: only phi, itself a leaf (Analysis.to_dict pseudonymises what it returns)
    assert g["types"] <= {"phi"}, sorted(g["types"])
    assert g["organs"] <= {"errors"}, sorted(g["organs"])


def test_nothing_inside_imports_the_package_face():
    face = {_module_name(f) for f in PKG.rglob("*.py") if "dicompipe" in _imports(f)}
    assert not face, f"modules importing the package face (dicompipe/__init__.py): {face}"


def test_no_cycles_between_components():
    assert _cycles(graph()) == []


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
