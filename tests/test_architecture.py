"""The dependency rules of shared/DESIGN.md, checked on every import statement (lazy ones too).

Parts import only downward: the registry imports none of the others; the gateway and
the trainer import the registry and never each other; loadtest is an HTTP client and
imports nothing of ours. Whole-system tools live above them all (lora_gateway/,
benchmarks/, tests/).
"""

from __future__ import annotations

import ast
import importlib
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


# Each part's __init__ names what the others may use (its __all__). The parts and the command
# import one another only through those names; lora_gateway may also take each part's command
# module (``cli``, ``adapter_cli``) to compose ``lora-gateway``. benchmarks/ and tests/ measure
# and test internals on purpose, and are not held to it.
PARTS = ("adapters_registry", "gateway", "trainer", "loadtest")
IMPORTERS = (*PARTS, "lora_gateway")
COMMAND_MODULES = {"cli", "adapter_cli"}


def cross_part_imports(root: Path = REPO) -> list[tuple[str, str, str, list[str]]]:
    """(place, importing package, imported module, names) for every import of another part."""
    found = []
    for pkg in IMPORTERS:
        for path in sorted((root / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                place = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Import):
                    found += [(place, pkg, a.name, []) for a in node.names
                              if a.name.split(".")[0] in PARTS and a.name.split(".")[0] != pkg]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    part = node.module.split(".")[0]
                    if part in PARTS and part != pkg:
                        found.append((place, pkg, node.module, [a.name for a in node.names]))
    return found


def surface_violations(root: Path = REPO) -> list[str]:
    public = {part: set(importlib.import_module(part).__all__) for part in PARTS}
    wrong = []
    for place, pkg, module, names in cross_part_imports(root):
        part, _, sub = module.partition(".")
        command = pkg == "lora_gateway"
        if sub:
            if not (command and sub in COMMAND_MODULES):
                wrong.append(f"{place} imports {module} (not {part}'s surface)")
            continue
        for name in names:
            if name not in public[part] and not (command and name in COMMAND_MODULES):
                wrong.append(f"{place} imports {name} from {part}, which does not name it in __all__")
    return wrong


def test_parts_use_one_another_only_through_their_curated_surfaces() -> None:
    assert not surface_violations(), surface_violations()


def test_the_surface_rule_sees_submodules_and_unlisted_names(tmp_path: Path) -> None:
    for pkg in IMPORTERS:
        (tmp_path / pkg).mkdir()
    (tmp_path / "gateway" / "x.py").write_text(
        "from adapters_registry.hashing import sha256_file\nfrom adapters_registry import Registry\n"
        "def f():\n    from adapters_registry import _audit\n    import trainer.train\n")
    (tmp_path / "lora_gateway" / "y.py").write_text("from gateway import cli\nfrom trainer import sft\n")
    assert surface_violations(tmp_path) == [
        "gateway/x.py:1 imports adapters_registry.hashing (not adapters_registry's surface)",
        "gateway/x.py:4 imports _audit from adapters_registry, which does not name it in __all__",
        "gateway/x.py:5 imports trainer.train (not trainer's surface)",
        "lora_gateway/y.py:2 imports sft from trainer, which does not name it in __all__"]


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
