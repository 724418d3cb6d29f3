"""The benchmark scripts import: most of them run only on a GPU lease or in a long CPU run, where a name an lcq module
no longer has would cost the step (pyflakes sees names undefined in a file, not names missing from another)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.stem for path in (ROOT / "bench").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name):
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench/{name}.py says what it measures and how it is run"


def _imported_names(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from lcq... / bench... / . import name` in the file, inside functions too."""
    import ast

    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: from the file's package, up level - 1
            module = ".".join(package[:len(package) - node.level + 1] + ((node.module,) if node.module else ()))
        else:
            module = node.module or ""
        if module.split(".")[0] in ("lcq", "bench"):
            found += [(module, alias.name, node.lineno) for alias in node.names]
    return found


def test_every_name_imported_from_the_package_exists():
    """Imports inside functions included: the GPU paths import Triton's modules where they run (a CUDA tensor's
    product, a GPU benchmark's step), so a name missing there shows first on a GPU."""
    sys.path.insert(0, str(ROOT))
    missing = []
    for path in sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "lcq").rglob("*.py")]):
        for module, name, line in _imported_names(path):
            target = importlib.import_module(module)
            if name != "*" and not hasattr(target, name):
                try:
                    importlib.import_module(f"{module}.{name}")  # a submodule
                except ImportError:
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {module}.{name}")
    assert not missing, missing
