"""The layering that ARCHITECTURE.md describes, read off the source: which package may import which.

Every import statement of every module is parsed (no module is executed), so a rule broken anywhere,
even in a branch that rarely runs, fails here with the file and line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "adyolo"
STDLIB = set(sys.stdlib_module_names)
MAX_LAUNCH_LINES = 100


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
    return found


def modules_in(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def violations(paths: list[Path], forbidden) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in paths
        for line, module in imports(path)
        if forbidden(module)
    ]


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_model_imports_only_torch_and_the_leaf_modules():
    allowed = ("torch", "adyolo.model", "adyolo.schema", "adyolo.layout")
    bad = violations(modules_in("adyolo/model"), lambda m: m.split(".")[0] not in STDLIB and not under(m, *allowed))
    assert not bad, "\n".join(bad)


def test_only_the_engine_imports_accelerate_and_deepspeed():
    outside = [p for p in modules_in("adyolo", "launch") if "engine" not in p.relative_to(ROOT).parts]
    bad = violations(outside, lambda m: under(m, "accelerate", "deepspeed"))
    assert not bad, "\n".join(bad)


def test_the_engine_gets_config_sections_not_the_composed_run_config():
    bad = violations(
        modules_in("adyolo/engine"), lambda m: under(m, "adyolo.config", "adyolo.run", "adyolo.bench", "adyolo.plan")
    )
    assert not bad, "\n".join(bad)


def test_prediction_evaluation_and_export_need_no_training_engine():
    paths = modules_in("adyolo/eval", "adyolo/export", "adyolo/predict")
    paths += [PACKAGE / "weights.py", ROOT / "launch" / "detect.py", ROOT / "launch" / "export.py"]
    bad = violations(paths, lambda m: under(m, "adyolo.engine", "adyolo.run", "adyolo.bench"))
    assert not bad, "\n".join(bad)


UPPER = ("adyolo.run", "adyolo.bench", "adyolo.plan", "adyolo.config", "adyolo.engine", "adyolo.eval", "adyolo.export")


@pytest.mark.parametrize("lower", ["adyolo/model", "adyolo/data", "adyolo/loss"])
def test_lower_layers_never_import_upper_ones(lower):
    upper = (*UPPER, "adyolo.predict", "adyolo.weights", "adyolo.tracking")
    bad = violations(modules_in(lower), lambda m: under(m, *upper))
    assert not bad, "\n".join(bad)


def test_prediction_sits_below_evaluation():
    """Evaluation runs the detector; the detector never needs evaluation (no cycle between them)."""
    bad = violations(modules_in("adyolo/predict"), lambda m: under(m, *UPPER))
    assert not bad, "\n".join(bad)


def test_launch_scripts_are_thin_and_no_test_loads_one():
    long = [
        f"{p.name}: {n} lines"
        for p in modules_in("launch")
        if (n := len(p.read_text().splitlines())) > MAX_LAUNCH_LINES
    ]
    assert not long, f"launch scripts over {MAX_LAUNCH_LINES} lines (move the logic into the package): {long}"
    # Tests reach the logic through the package; a script is only ever run as a process.
    loaders = violations(modules_in("tests"), lambda m: under(m, "importlib", "runpy", "launch"))
    assert not loaders, loaders


def test_the_rules_see_real_imports():
    """The parser is not vacuous: it finds the imports it should, relative ones included."""
    found = {module for _, module in imports(PACKAGE / "engine" / "trainer.py")}
    assert {"accelerate", "adyolo.engine.step", "adyolo.eval.evaluator", "torch"} <= found
    assert under("adyolo.engine.step", "adyolo.engine") and not under("adyolo.engineering", "adyolo.engine")
