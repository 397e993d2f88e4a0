"""The house rules of the packages, checked on their source: no import cycle (function-level
imports included), no module past 500 lines, no test code shipped, and every database file name
spelt only in chunk_store/layout.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from chunk_store import layout

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("chunk_store", "index_builder", "retro")
MAX_LINES = 500


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``path`` imports anywhere in its body (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import mod` imports the module pkg.mod when there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                path = [n for n, _ in stack]
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}


def test_no_import_cycle_anywhere() -> None:
    modules = package_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 40, "the import walk found too few imports to be trusted"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_module_size(name: str) -> None:
    lines = len(package_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (keep modules under {MAX_LINES})"


def test_no_test_code_in_the_packages() -> None:
    for name, path in package_modules().items():
        assert not name.rsplit(".", 1)[-1].startswith(("test", "testing")), name
        assert not re.search(r"^\s*(import pytest|from pytest|import hypothesis)", path.read_text(), re.M), name


def test_database_file_names_only_in_layout() -> None:
    names = [v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)
             and re.fullmatch(r"[.\w]+\.(npy|json|jsonl|model|index|npz)", v)]
    assert len(names) >= 10
    for name, path in package_modules().items():
        if name == "chunk_store.layout":
            continue
        text = path.read_text()
        for file_name in names:
            # a quoted file name, alone or at the end of a path: "chunks.npy", f"{x}/chunks.npy"
            assert not re.search(rf"[\"'/]{re.escape(file_name)}[\"']", text), f"{name} spells {file_name}"


def test_each_stage_registered_once_and_nowhere_else() -> None:
    """A stage is one registry entry and one Stage class of that name; no other module keeps its
    own list of the stages or its own prerequisite (those were three places before)."""
    from chunk_store.framework import registry

    names = registry.stage_names()
    classes: dict[str, list[str]] = {}
    for mod, path in package_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, (ast.Name, ast.Subscript)) and ast.unparse(b).split("[")[0].endswith("Stage")
                    for b in node.bases):
                for stmt in node.body:
                    targets = [t.id for t in getattr(stmt, "targets", [getattr(stmt, "target", None)])
                               if isinstance(t, ast.Name)]
                    if "requires" in targets:
                        raise AssertionError(f"{mod}.{node.name} says its prerequisite itself: registry only")
                    value = getattr(stmt, "value", None)
                    if "name" in targets and isinstance(value, ast.Constant):
                        classes.setdefault(value.value, []).append(f"{mod}.{node.name}")
            if mod != "chunk_store.framework.registry" and isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                listed = {e.value for e in node.elts if isinstance(e, ast.Constant)} & set(names)
                assert len(listed) < 3, f"{mod} lists the stages {sorted(listed)}: read the registry instead"
    assert sorted(classes) == sorted(names), (classes, names)
    assert all(len(c) == 1 for c in classes.values()), classes
    for entry in registry.stages():
        assert classes[entry.name][0].startswith(entry.module + "."), (entry, classes[entry.name])


def test_tests_mirror_the_packages_and_share_helpers_only_through_fixtures() -> None:
    """tests/ has one folder a package plus e2e, fuzz, gpu and benchmarks; helpers shared
    between tests live in tests/fixtures/ and no test module imports another."""
    tests = REPO / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders == set(PACKAGES) | {"e2e", "fuzz", "gpu", "benchmarks", "fixtures"}, folders
    for path in tests.rglob("*.py"):
        if path.parent.name == "fixtures" or path.name in ("__init__.py", "conftest.py"):
            continue
        assert path.name.startswith("test_"), f"{path}: a helper module outside tests/fixtures/"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.split(".")[-1].startswith("test_"), f"{path} imports the test module {name}"


def run_folder_name_spellings(text: str, names: list[str]) -> list[str]:
    """The run-folder names ``text`` spells quoted, alone or ending a path ("latest", f"{x}/latest");
    a package name handed to find_spec ("tensorboard") is not a path."""
    text = re.sub(r"find_spec\([\"']\w+[\"']\)", "", text)
    return [n for n in names if re.search(rf"[\"'/]{re.escape(n)}[\"']", text)]


def test_run_folder_names_only_in_run_layout() -> None:
    from retro import run_layout

    names = [v for k, v in vars(run_layout).items() if k.isupper() and isinstance(v, str)]
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "latest", "db.json"} <= set(names)
    assert run_folder_name_spellings('p = run / "metrics.jsonl"', names) == ["metrics.jsonl"]  # the check bites
    modules = {name: path for name, path in package_modules().items() if name != "retro.run_layout"}
    modules["train"] = REPO / "train.py"
    for name, path in modules.items():
        spelt = run_folder_name_spellings(path.read_text(), names)
        assert not spelt, f"{name} spells {spelt}: use retro.run_layout"
