"""The import graph of racedit's Python modules, read from the source with ``ast``: no module
imports a private (``_name``) function or class of another, and no import circles, neither
at module level nor through imports inside functions (a deferred import that closes a
circle still couples the two modules both ways)."""
import ast
import glob
import os

import racedit

ROOT = os.path.dirname(os.path.abspath(racedit.__file__))

# Private names imported across modules: none (the list may only shrink).
PRIVATE_ALLOWED = set()
# Import circles tolerated: none.
CYCLE_EXCLUDED = set()
# What the trainer builds on; none of it may import the trainer.
BELOW_TRAIN = ("racedit.configs", "racedit.checkpoint", "racedit.factory", "racedit.runs",
               "racedit.sample", "racedit.evaluate", "racedit.report", "racedit.data",
               "racedit.diffusion")


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _is_module(dotted):
    """True for a racedit module or package: a .py file, a package folder or a compiled
    extension (racedit._C)."""
    base = os.path.join(os.path.dirname(ROOT), *dotted.split("."))
    return (os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))
            or bool(glob.glob(base + ".*.so") + glob.glob(base + ".*.pyd")))


def _imports(path):
    """[(target module, name or None, module_level)] of the racedit imports in ``path``."""
    mod = _module_name(path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, module_level):
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                found.extend((t, n, module_level) for t, n in _resolve(child, package))
            elif isinstance(child, ast.Import):
                found.extend((a.name, None, module_level) for a in child.names
                             if a.name.split(".")[0] == "racedit")
            visit(child, inner)

    visit(tree, True)
    return found


def _resolve(node, package):
    """(target module, imported name or None) of each name of a ``from ... import``."""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    elif (node.module or "").split(".")[0] == "racedit":
        target = node.module
    else:
        return []
    out = []
    for alias in node.names:
        if alias.name != "*" and _is_module(f"{target}.{alias.name}"):
            out.append((f"{target}.{alias.name}", None))  # a submodule, not a name
        else:
            out.append((target, None if alias.name == "*" else alias.name))
    return out


def _graph():
    """{module: [(target, name, module_level)]} of every racedit/**/*.py."""
    files = glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
    return {_module_name(p): _imports(p) for p in sorted(files)}


def _cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            strong(v)
    return comps


def _edges(graph, module_level_only):
    edges = {}
    for mod, imports in graph.items():
        for target, _, module_level in imports:
            if target == mod or (module_level_only and not module_level):
                continue
            if frozenset({mod, target}) in CYCLE_EXCLUDED:
                continue
            edges.setdefault(mod, set()).add(target)
    return edges


def test_the_graph_sees_the_imports():
    g = _graph()
    assert ("racedit.factory", "model_from_checkpoint", False) in g["racedit.sample"]
    assert ("racedit.runs", "latest_checkpoint", True) in g["racedit.sample"]
    assert ("racedit._C", None, True) in g["racedit.ops.route"]  # from .. import _C
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    bad = [(mod, target, name) for mod, imports in _graph().items()
           for target, name, _ in imports
           if name and name.startswith("_") and not name.startswith("__") and target != mod
           and (mod, target, name) not in PRIVATE_ALLOWED]
    assert bad == [], f"private names imported from another module: {bad}"


def test_no_import_cycles_at_module_level():
    assert _cycles(_edges(_graph(), module_level_only=True)) == []


def test_no_import_cycles_through_function_level_imports():
    assert _cycles(_edges(_graph(), module_level_only=False)) == []


def test_what_the_trainer_builds_on_does_not_import_it():
    g = _graph()
    bad = [(m, name) for m in BELOW_TRAIN for target, name, _ in g.get(m, ())
           if target == "racedit.train"]
    assert bad == []
