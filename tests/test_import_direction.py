"""The analysis side (every module of glomscan outside train/ and cli/) never imports the
training code: a hospital's analysis install needs neither its code nor its dependencies."""

import ast
from pathlib import Path

import glomscan

PACKAGE = Path(glomscan.__file__).parent


def imported_modules(relative_path: Path, text: str) -> set[str]:
    """Absolute names of the glomscan modules that the module at ``relative_path`` (inside the
    package) imports, relative imports resolved."""
    package = ["glomscan", *relative_path.parent.parts]
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "glomscan" or n.startswith("glomscan.")}


def test_analysis_never_imports_training():
    analysis = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("train", "cli")]
    assert len(analysis) > 15
    offenders = {}
    for path in analysis:
        relative = path.relative_to(PACKAGE)
        found = sorted(m for m in imported_modules(relative, path.read_text()) if m.startswith("glomscan.train"))
        if found:
            offenders[str(relative)] = found
    assert not offenders


def test_the_check_sees_relative_and_absolute_imports():
    assert "glomscan.train.segment" in imported_modules(Path("pipeline.py"), "from .train import segment\n")
    assert "glomscan.train" in imported_modules(Path("engines/x.py"), "from ..train import data\n")
    assert "glomscan.train.data" in imported_modules(Path("report.py"), "import glomscan.train.data\n")
    assert not imported_modules(Path("report.py"), "from .labels import NORMAL\n") & {"glomscan.train"}
