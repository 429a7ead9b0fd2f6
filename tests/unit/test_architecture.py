"""The floors of the house: which labelwright package may import which (README, "Architecture").

Read from the source files' syntax trees, lazy imports inside functions included, so a test fails the
moment an import runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("specialists", "training", "cluster", "orchestrator")
# What each floor may import besides itself. training and cluster both stand on specialists and do not
# lean on each other; orchestrator is the roof.
MAY_IMPORT = {
    "specialists": set(),
    "training": {"specialists"},
    "cluster": {"specialists"},
    "orchestrator": {"specialists", "training", "cluster"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["labelwright", *parts])


def _imports(path: Path) -> set[str]:
    return imports_in(path.read_text(encoding="utf-8"), _module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """The labelwright modules ``source`` (the text of ``module``) imports, relative imports resolved, at any
    depth of the file."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("labelwright."))
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if not target.startswith("labelwright."):
                continue
            # "from labelwright.specialists import prompts" imports the module labelwright.specialists.prompts
            submodules = {f"{target}.{a.name}" for a in node.names} & ALL_MODULES
            found.update(submodules or {target})
    return found


ALL_MODULES = {_module_name(p) for package in PACKAGES for p in (ROOT / package).glob("*.py")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            graph[_module_name(path)] = {m for m in _imports(path) if m != _module_name(path)}
    return graph


def _floor(module: str) -> str:
    return module.split(".")[1]


def floor_breaks(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if _floor(t) != _floor(m) and _floor(t) not in MAY_IMPORT[_floor(m)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (each found once, from its smallest module)."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    found.append(path)
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def test_every_import_runs_down_the_floors():
    assert floor_breaks(_graph()) == []


def test_no_modules_import_each_other():
    assert cycles(_graph()) == []


def test_the_checks_see_a_break_and_a_cycle():
    """The rule's own check: an upward import and a two-module circle are found."""
    graph = {"labelwright.specialists.a": {"labelwright.orchestrator.job"},
             "labelwright.training.x": {"labelwright.training.y"}, "labelwright.training.y": {"labelwright.training.x"},
             "labelwright.cluster.c": {"labelwright.training.x"}}
    assert floor_breaks(graph) == ["labelwright.cluster.c imports labelwright.training.x",
                                   "labelwright.specialists.a imports labelwright.orchestrator.job"]
    assert cycles(graph) == [["labelwright.training.x", "labelwright.training.y"]]


@pytest.mark.parametrize("source, expected", [
    ("from labelwright.specialists import prompts", {"labelwright.specialists.prompts"}),
    ("def f():\n    from labelwright.orchestrator.voting import calibrate", {"labelwright.orchestrator.voting"}),
    ("from .errors import ConfigError", {"labelwright.specialists.errors"}),
    ("from . import prompts", {"labelwright.specialists.prompts"}),
    ("import labelwright.cluster.runtime", {"labelwright.cluster.runtime"}),
])
def test_imports_are_read_in_every_form(source, expected):
    assert imports_in(source, "labelwright.specialists.probe") == expected
