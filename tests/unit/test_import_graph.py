"""The package boundaries a reader can see (issue 12): imports flow one way.

    shared_models  <-  protocol  <-  server, client  <-  fedsynth (CLI, deployment, demo)  <-  bench

``shared_models`` imports none of the others and no Flower; ``protocol`` (the wire) only
``shared_models``; ``server`` and ``client`` never import each other. Every import counts, also
those inside functions (read with ``ast``, nothing is executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared_models", "protocol", "server", "client", "fedsynth", "bench")
# what each package may import of the others (the layering above)
ALLOWED = {
    "shared_models": set(),
    "protocol": {"shared_models"},
    "server": {"shared_models", "protocol"},
    "client": {"shared_models", "protocol"},
    "fedsynth": {"shared_models", "protocol", "server", "client"},
    "bench": {"shared_models", "protocol", "server", "client", "fedsynth"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """{top-level module imported: files importing it} for every .py file of ``package``."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                out.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return out


def test_imports_flow_one_way() -> None:
    graph = {p: {m for m in imports_of(p) if m in PACKAGES and m != p} for p in PACKAGES}
    wrong = {p: sorted(graph[p] - ALLOWED[p]) for p in PACKAGES if graph[p] - ALLOWED[p]}
    assert not wrong, f"imports against the layering: {wrong}"


def test_no_cycle_between_top_level_packages() -> None:
    graph = {p: {m for m in imports_of(p) if m in PACKAGES and m != p} for p in PACKAGES}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, (*path, node))
        done.add(node)

    for p in PACKAGES:
        visit(p, ())


def test_shared_models_imports_no_flower_and_flower_internals_stay_in_one_module() -> None:
    assert "flwr" not in imports_of("shared_models")
    private = ("flwr.supercore", "flwr.supernode", "flwr.superlink", "flwr.cli", "flwr.common",
               "flwr.proto", "flwr.serverapp.strategy.strategy_utils")
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "protocol" / "flower_private.py" or package == "bench":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                mod = (node.module if isinstance(node, ast.ImportFrom) else None) or ""
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [mod]
                offenders += [f"{path.relative_to(ROOT)}: {m}" for m in mods
                              if any(m == p or m.startswith(p + ".") for p in private)]
    assert not offenders, ("Flower's non-public modules are used outside "
                           f"protocol/flower_private.py: {offenders}")


def test_dicom_package_modules_import_one_way_and_others_use_its_public_names() -> None:
    """client/dicom/: each module imports its siblings directly (never the package ``__init__``,
    which only re-exports), without a cycle; no module outside it reaches a ``_private`` name."""
    pkg = ROOT / "client" / "dicom"
    graph: dict[str, set[str]] = {}
    for path in sorted(pkg.glob("*.py")):
        if path.name == "__init__.py":
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module, f"{path.name} imports the package __init__"
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("client.dicom"), path.name
        graph[path.stem] = deps
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node not in done:
            for nxt in graph[node]:
                visit(nxt, (*path, node))
            done.add(node)

    for module in graph:
        visit(module, ())

    private = []
    for package in ("client", "fedsynth", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.parent == pkg:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == "dicom" and node.attr.startswith("_")):
                    private.append(f"{path.relative_to(ROOT)}: dicom.{node.attr}")
                if isinstance(node, ast.ImportFrom) and (
                        (node.module or "").startswith("client.dicom")
                        or (node.level == 1 and (node.module or "").startswith("dicom"))):
                    private += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                                if a.name.startswith("_")]
    assert not private, f"private names of client.dicom used outside it: {private}"


# ------------------------------------------------------------------ module-level cycles (issue 23)

CYCLE_PACKAGES = ("shared_models", "protocol", "server", "client", "fedsynth")


def _module_files() -> dict[str, Path]:
    out = {}
    for package in CYCLE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def module_graph() -> dict[str, set[str]]:
    """{module: modules of these packages it imports}, imports inside functions included.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of
    ``pkg`` (its ``__init__``)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[:len(base) - node.level + 1] if node.level > 1 else base
                    mod = ".".join([*root, *(node.module.split(".") if node.module else [])])
                else:
                    mod = node.module or ""
                for a in node.names:
                    targets.append(f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod)
            for t in targets:
                while t and t not in files:  # import a.b.c of a module a.b: counts as a.b
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules_counting_imports_inside_functions() -> None:
    cycles = import_cycles(module_graph())
    assert not cycles, "module import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
