"""The dependency rules of shared/DESIGN.md, checked on every import statement (lazy ones too).

Parts import only downward: the registry imports none of the others; the gateway and
the trainer import the registry and never each other; loadtest is an HTTP client and
imports nothing of ours. Whole-system tools live above them all (lora_gateway/,
benchmarks/, tests/).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"adapters_registry", "gateway", "trainer", "loadtest", "lora_gateway", "benchmarks"}
ALLOWED = {
    "adapters_registry": set(),
    "gateway": {"adapters_registry"},
    "trainer": {"adapters_registry"},
    "loadtest": set(),
    "lora_gateway": OURS - {"lora_gateway", "benchmarks"},
    "benchmarks": OURS - {"benchmarks"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def package_graph(root: Path = REPO) -> dict[str, dict[str, list[str]]]:
    """package -> imported package of ours -> the places that import it."""
    graph: dict[str, dict[str, list[str]]] = {pkg: {} for pkg in ALLOWED}
    for pkg in ALLOWED:
        for path in sorted((root / pkg).rglob("*.py")):
            for line, target in imported_packages(path):
                if target in OURS and target != pkg:
                    graph[pkg].setdefault(target, []).append(f"{path.relative_to(root)}:{line}")
    return graph


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_package_imports_only_what_the_design_allows(pkg: str) -> None:
    forbidden = {target: places for target, places in package_graph()[pkg].items()
                 if target not in ALLOWED[pkg]}
    assert not forbidden, f"{pkg} must not import {sorted(forbidden)}: {forbidden}"


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path: Path) -> None:
    # A rule that cannot fail is no rule: plant each kind of forbidden import and find it.
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "x.py").write_text(
        "def f():\n    import trainer.train\n    from loadtest.client import send\n"
        "from . import sibling\nimport numpy\n")
    for pkg in ALLOWED:
        (tmp_path / pkg).mkdir(exist_ok=True)
    assert package_graph(tmp_path)["gateway"] == {"trainer": ["gateway/x.py:2"],
                                                  "loadtest": ["gateway/x.py:3"]}


# Third-party packages only one part may use, and only lazily (inside a function), so that
# importing the part's modules never needs them: TRL (and its `datasets`) serve the trainer's
# preference tuning; the gateway and everything it imports must run without them.
TRAINER_ONLY = {"trl", "datasets"}


def third_party_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, top-level package, at module level?) of every absolute import in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0], id(node) in top))
    return found


def test_trl_is_imported_by_the_trainer_only_and_lazily() -> None:
    wrong = []
    for pkg in ALLOWED:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, target, module_level in third_party_imports(path):
                if target in TRAINER_ONLY and (pkg != "trainer" or module_level):
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, wrong
    # and the rule sees what it looks for
    assert any(target == "trl" and not module_level
               for _, target, module_level in third_party_imports(REPO / "trainer" / "dpo.py"))
