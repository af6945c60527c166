"""The project's modules import each other without a circle; the loader does not know the builder."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

MODULES = sorted(p.stem for p in REPO.glob("*.py"))


def project_imports(module: str) -> set[str]:
    """Every project module that ``module`` imports anywhere in its source: at the top, inside
    functions (lazy imports count too) or as ``from x import y``."""
    tree = ast.parse((REPO / f"{module}.py").read_text(), filename=f"{module}.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & set(MODULES)) - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports as a list of modules (first == last), or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_circle():
    graph = {m: project_imports(m) for m in MODULES}
    assert {"train", "dataset", "build_data", "rundir", "distribute", "runconfig", "report"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_the_loader_imports_nothing_of_the_builder(oasis_tree):
    assert "build_data" not in project_imports("dataset")
    # ... nor on its command line, when it has read a data folder.
    code = (f"import sys, dataset; rc = dataset.main(['check', {str(oasis_tree)!r}]); "
            "assert 'build_data' not in sys.modules, 'build_data imported'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "train" in run.stdout, run.stderr


def test_each_help_says_where_the_commands_are():
    for script, says in (("dataset.py", "python build_data.py demo|prepare"),
                         ("build_data.py", "python dataset.py check")):
        run = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert run.returncode == 0 and says in " ".join(run.stdout.split()), run.stdout
    moved = subprocess.run([sys.executable, str(REPO / "dataset.py"), "demo", "--out", "x"], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
    assert moved.returncode == 2 and "run python build_data.py demo --out x" in moved.stderr, moved.stderr
