"""plait's package layers (README "Code layout"): imports only point down.

The contract is `[tool.importlinter]` in pyproject.toml, one `layers` contract over plait's
top-level modules, checked with import-linter. Besides running it on the real tree, these
tests check that it catches an upward import, that it names every top-level module (one
left out would escape it), that the top-level packages import each other without a cycle,
and that no plait import hides inside a function.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

import plait

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = ROOT / "plait"

# lint-imports in a fresh interpreter, so that `plait` is found on that process's sys.path:
# import-linter puts the working directory first, which is how a copy of the package can be
# checked in place of the real one. No cache: nothing is written next to the code.
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", LINT, str(PYPROJECT)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def contract() -> dict:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) == 1 and contracts[0]["type"] == "layers"
    return contracts[0]


def top_level(module: str) -> str:
    """plait.parallel.zero -> plait.parallel; plait itself stays plait."""
    return ".".join(module.split(".")[:2])


def test_the_layers_contract_holds():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_contract_catches_an_upward_import(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "plait", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "plait" / "config.py"
    config.write_text("import plait.train.trainer  # upward: config sits below train\n" + config.read_text())
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "plait.config is not allowed to import plait.train" in done.stdout, done.stdout[-6000:]
    assert "plait.config -> plait.train.trainer (l.1)" in done.stdout, done.stdout[-6000:]


def test_every_top_level_module_is_a_layer():
    spec = contract()
    # With `exhaustive`, import-linter itself refuses a top-level module missing from the layers.
    assert spec["containers"] == ["plait"] and spec["exhaustive"] is True
    assert not spec.get("exhaustive_ignores") and not spec.get("ignore_imports")
    named = {name.strip().strip("()") for layer in spec["layers"] for name in re.split(r"[|:]", layer)}
    present = {info.name for info in pkgutil.iter_modules(plait.__path__)}
    assert named == present, f"missing from the contract: {present - named}; not in plait: {named - present}"


def test_top_level_packages_import_each_other_without_a_cycle():
    # grimp counts every import statement, those inside functions too.
    graph = grimp.build_graph("plait", cache_dir=None)
    edges: dict[str, set[str]] = {}
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            a, b = top_level(importer), top_level(imported)
            if a != b and "plait" not in (a, b):
                edges.setdefault(a, set()).add(b)

    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            hops = []
            for a, b in zip(cycle, cycle[1:]):
                chain = graph.find_shortest_chain(a, b, as_packages=True)
                hops.append(" -> ".join(chain) if chain else f"{a} -> {b}")
            pytest.fail("package cycle " + " -> ".join(cycle) + ":\n  " + "\n  ".join(hops))


# Files (relative to plait/) whose plait imports may stay inside functions, with the reason.
# Only the top of the layers qualifies: nothing but __main__ imports the cli, so a late import
# there cannot be hiding a cycle.
ALLOWED_INNER_IMPORTS = {
    "cli.py": "the commands that need torch import it (~1 s) late: `plait --help` and `plait plan` never do",
}


def plait_imports_inside_functions() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    modules = ["." * node.level + (node.module or "")]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    if module.startswith(".") or module == "plait" or module.startswith("plait."):
                        found.append((path.relative_to(PACKAGE).as_posix(), node.lineno, module))
    return sorted(set(found))  # nested functions are walked twice


def test_no_plait_import_inside_a_function():
    found = plait_imports_inside_functions()
    inner = [f"plait/{file}:{line}: {module}" for file, line, module in found if file not in ALLOWED_INNER_IMPORTS]
    assert not inner, "imports of plait inside functions (move them to the top):\n" + "\n".join(inner)
    stale = set(ALLOWED_INNER_IMPORTS) - {file for file, _, _ in found}
    assert not stale, f"no late plait imports left in {sorted(stale)}: drop them from ALLOWED_INNER_IMPORTS"
