"""The packages' layers, bottom to top: core (settings, errors, table catalog, vocabularies),
udfs (models and their UDFs), etl (the lakehouse and its jobs), training, jobs (the runner, CLI
and service). A module imports only from its own layer or lower ones: every import statement,
those inside functions too, parsed with ast."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "udfs", "etl", "training", "jobs")


def imported_modules(path: Path):
    """(line, absolute module name) of every import in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def upward_imports(root: Path = ROOT) -> list[str]:
    found = []
    for level, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top in LAYERS and LAYERS.index(top) > level:
                    found.append(f"{path.relative_to(root)}:{line} imports {module} ({top} is above {package})")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    (tmp_path / "udfs").mkdir()
    (tmp_path / "udfs" / "late.py").write_text("def f():\n    from etl.config import Settings\n")
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "ok.py").write_text("import json\nfrom core import errors\n")
    assert upward_imports(tmp_path) == ["udfs/late.py:2 imports etl.config (etl is above udfs)"]
