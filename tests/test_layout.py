"""The package's floors: core <- analyses <- presentation <- chapter/cli, read from the import statements."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qklib"
CORE, ANALYSIS, PRESENT, TOP = 0, 1, 2, 3


def floor(module: str) -> int:
    """qklib.core.* is the ground floor, qklib.present.* the presentation floor, qklib.chapter/cli/__init__/
    __main__ the top; every other module (one per paper section, and the search package) is an analysis."""
    parts = module.split(".")
    if parts[:2] == ["qklib", "core"]:
        return CORE
    if parts[:2] == ["qklib", "present"]:
        return PRESENT
    if parts in (["qklib"], ["qklib", "chapter"], ["qklib", "cli"], ["qklib", "__main__"]):
        return TOP
    return ANALYSIS


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, name: str):
    """``(imported module, imported names, at top level?)`` for every import of a qklib module in ``path``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "qklib":
                yield target, [alias.name for alias in node.names], id(node) in top_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qklib":
                    yield alias.name, [], id(node) in top_level


MODULES = sorted(PACKAGE.rglob("*.py"))
MODULE_NAMES = {module_name(path) for path in MODULES}


def violations(path: Path, importer: str) -> list[str]:
    found = []
    for target, names, top_level in internal_imports(path, importer):
        submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULE_NAMES]
        for module in submodules or [target]:
            if floor(importer) != TOP and floor(module) > floor(importer):
                found.append(f"{importer} (floor {floor(importer)}) imports {module} (floor {floor(module)})")
        private = [n for n in names if n.startswith("_")]
        if private:
            found.append(f"{importer} imports private names {private} from {target}")
        if not top_level:
            found.append(f"{importer} imports {target} inside a function; import it at the top of the module")
    return found


def test_every_floor_is_populated():
    floors = {floor(name) for name in MODULE_NAMES}
    assert floors == {CORE, ANALYSIS, PRESENT, TOP}


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down_are_public_and_at_the_top(path):
    assert violations(path, module_name(path)) == []


def test_the_check_catches_upward_private_and_hidden_imports(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("from ..present.render import mosaic\nfrom .svd import _secret\n\n"
                      "def f():\n    from ..modes import mode_maps\n")
    found = violations(source, "qklib.core.fake")
    assert any("imports qklib.present.render" in v for v in found)
    assert any("private names ['_secret']" in v for v in found)
    assert any("inside a function" in v for v in found)
    assert any("imports qklib.modes" in v for v in found)
