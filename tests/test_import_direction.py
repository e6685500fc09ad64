"""Imports go one way: the analysis side (every module of glomscan outside train/, augment/ and
cli/) never imports the training code nor the augmentation: a hospital's analysis install needs
neither their code nor their dependencies. train/ (making and checking the shipped models) never
imports augment/ (the paper's inpainting augmentation, research); augment/ builds on train/ and
the analysis side; only cli/ imports all three (lazily)."""

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


def inside(module: str, package: str) -> bool:
    """``module`` is ``package`` or one of its modules (``glomscan.trainer`` is not in ``glomscan.train``)."""
    return module == package or module.startswith(package + ".")


def offenders(folders: tuple[str, ...] | None, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """The modules in ``folders`` (top-level folders of the package; None: every module outside
    train/, augment/ and cli/) that import a module of a ``forbidden`` package, with what they import."""
    found = {}
    for path in modules_in(folders):
        relative = path.relative_to(PACKAGE)
        bad = sorted(m for m in imported_modules(relative, path.read_text()) if any(inside(m, f) for f in forbidden))
        if bad:
            found[str(relative)] = bad
    return found


def modules_in(folders: tuple[str, ...] | None) -> list[Path]:
    if folders is None:
        return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("train", "augment", "cli")]
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] in folders]


def test_analysis_never_imports_training():
    analysis = modules_in(None)
    assert len(analysis) > 15
    assert not offenders(None, ("glomscan.train", "glomscan.augment"))


def test_training_never_imports_augmentation():
    training = modules_in(("train",))
    assert {"settings.py", "dataset/data.py", "fit/segment.py", "evaluation/evaluate.py"} <= {
        str(p.relative_to(PACKAGE / "train")) for p in training}
    assert not offenders(("train",), ("glomscan.augment", "glomscan.cli"))


def test_augmentation_imports_only_training_and_analysis():
    augmentation = modules_in(("augment",))
    assert {"settings.py", "inpaint.py", "maskgan.py", "synthesize.py"} <= {
        str(p.relative_to(PACKAGE / "augment")) for p in augmentation}
    assert not offenders(("augment",), ("glomscan.cli",))
    # it does build on train/ (were it not to, the split would be pointless to check)
    assert any(inside(m, "glomscan.train") for p in augmentation
               for m in imported_modules(p.relative_to(PACKAGE), p.read_text()))


def test_the_check_sees_relative_and_absolute_imports():
    assert "glomscan.train.segment" in imported_modules(Path("pipeline.py"), "from .train import segment\n")
    assert "glomscan.train" in imported_modules(Path("engines/x.py"), "from ..train import data\n")
    assert "glomscan.train.data" in imported_modules(Path("report.py"), "import glomscan.train.data\n")
    assert not imported_modules(Path("report.py"), "from .labels import NORMAL\n") & {"glomscan.train"}


def test_the_check_resolves_imports_from_sub_packages():
    # three dots from train/fit/ reach the package root: glomscan.augment, not glomscan.train.augment
    assert "glomscan.augment.crops" in imported_modules(Path("train/fit/segment.py"), "from ...augment import crops\n")
    assert "glomscan.train.dataset.data" in imported_modules(Path("train/fit/segment.py"),
                                                             "from ..dataset.data import load_patch\n")
    assert "glomscan.augment.settings" in imported_modules(Path("augment/inpaint.py"), "from .settings import X\n")
    assert "glomscan.train.settings" in imported_modules(Path("augment/settings.py"), "from ..train.settings import X\n")
    assert inside("glomscan.augment.inpaint", "glomscan.augment")
    assert not inside("glomscan.augmented", "glomscan.augment")


def test_the_check_finds_offenders_of_each_rule(tmp_path, monkeypatch):
    """The three rules fail on a module breaking them (a throwaway package tree, not glomscan's)."""
    for relative, text in {"report.py": "from .augment import inpaint\n",
                           "train/fit/segment.py": "from ...augment.crops import read_crops\n",
                           "augment/inpaint.py": "from ..cli import main\n",
                           "cli/training.py": "from ..augment import inpaint\nfrom ..train.fit import segment\n"}.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    assert offenders(None, ("glomscan.train", "glomscan.augment")) == {
        "report.py": ["glomscan.augment", "glomscan.augment.inpaint"]}
    assert offenders(("train",), ("glomscan.augment", "glomscan.cli")) == {
        "train/fit/segment.py": ["glomscan.augment.crops", "glomscan.augment.crops.read_crops"]}
    assert offenders(("augment",), ("glomscan.cli",)) == {"augment/inpaint.py": ["glomscan.cli", "glomscan.cli.main"]}
