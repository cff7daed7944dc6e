"""The code's shape, read from the source: imports run one way, with no circle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IDEA = {"jfmini.model", "jfmini.masks", "jfmini.forcing", "jfmini.jacobi", "jfmini.candidates"}
# The hardened process and file handling: signals, flags and the process, atomic writes and locks, the checks of
# every file read (checkpoints, states, trajectories, token caches, sweeps). errors.py (UserError) is not in it.
HARDENED = {f"jfmini.runtime.{m}" for m in ("signals", "cli", "writes", "checkpoints", "states", "files")}


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path, known):
    """The project modules a file imports anywhere in it (inside functions too), by name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n for n in names if n in known}
    return found


def import_graph():
    files = sorted(ROOT.glob("jfmini/**/*.py")) + sorted(ROOT.glob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): project_imports(p, known) - {module_name(p)} for p in files}


def cycles(graph):
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def reachable(graph, start):
    """Every module start imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert IDEA <= set(graph) and "train" in graph and "jfmini.runtime.engine" in graph
    assert cycles(graph) == []


def test_imports_run_one_way_between_the_layers():
    """The idea layer never imports the hardened file handling or the scripts' tools; the machinery imports
    neither the tools nor the idea layer, except where checkpoints.py builds the model a checkpoint describes."""
    graph = import_graph()
    tools = {m for m in graph if m.startswith("jfmini.tools")}
    assert "jfmini.tools.rows" in tools and HARDENED <= set(graph)
    for m in IDEA:
        assert not reachable(graph, m) & (HARDENED | tools), m     # not even through the machinery it uses
    upward = {(m, i) for m, deps in graph.items() if m.startswith("jfmini.runtime") for i in deps & (IDEA | tools)}
    assert upward == {("jfmini.runtime.checkpoints", "jfmini.model")}
