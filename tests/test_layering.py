"""The package's rooms and their one-way doors (docs/architecture.md), read from the
module-level imports of every module: ``training`` never imports ``distillers`` or
``schemes``; ``losses`` import nothing of the package but the registry; the configurations
import no loss; nothing imports the package's ``__init__``; the graph has no cycle."""
import ast
import os

import pytest

import textbrewer

PACKAGE = os.path.dirname(os.path.abspath(textbrewer.__file__))


def _modules():
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(name):
    """Package modules that ``name`` imports at module level (functions' imports aside)."""
    path, is_package = MODULES[name]
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = {f"{module}.{alias.name}" for alias in node.names
                          if f"{module}.{alias.name}" in MODULES}
            targets.update(submodules)  # `from .. import checkpoint` names a module
            if len(submodules) < len(node.names):
                targets.add(module)
    return {target for target in targets if target in MODULES}


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_graph_was_read():
    assert len(GRAPH) > 60
    assert "textbrewer.training.loop" in GRAPH["textbrewer.distillers.engine"]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("textbrewer.training")))
def test_training_never_imports_distillers_or_schemes(name):
    bad = sorted(t for t in GRAPH[name]
                 if t.startswith(("textbrewer.distillers", "textbrewer.schemes")))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("textbrewer.losses")))
def test_losses_import_only_the_registry(name):
    bad = sorted(t for t in GRAPH[name] if not t.startswith("textbrewer.losses")
                 and t != "textbrewer.registry")
    assert not bad, f"{name} imports {bad}"


def test_the_configurations_import_no_loss():
    reachable, stack = set(), ["textbrewer.configurations"]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in reachable:
                reachable.add(target)
                stack.append(target)
    assert not sorted(t for t in reachable if t.startswith("textbrewer.losses")
                      or t == "textbrewer.presets")


def test_nothing_imports_the_package_init():
    assert not sorted(name for name, targets in GRAPH.items() if "textbrewer" in targets)


def test_no_import_cycle():
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                raise AssertionError(" -> ".join(path + [name, target]))
            if target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
