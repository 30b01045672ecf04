"""The import rule of docs/ARCHITECTURE.md: a module imports only from its own layer or below.

Every module under src/higgs_tune is parsed with `ast`; every `higgs_tune.*` import counts,
at module top or inside a function, absolute or relative.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "higgs_tune"

# bottom to top; a top-level module or folder of higgs_tune -> its layer
LAYERS = {
    "errors": 0,
    "config": 0,
    "resources": 0,
    "runfs": 0,
    "model": 1,
    "data": 2,
    "families": 3,
    "infer": 4,
    "train": 5,
    "tiny": 6,
    "app": 7,
    "__main__": 7,
    "__init__": 0,  # the package root (`__version__`), imported with every module
}


def _top(module: str) -> str:
    """higgs_tune.infer.generate -> infer; higgs_tune -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(line, imported module) for every higgs_tune import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "higgs_tune" or alias.name.startswith("higgs_tune."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "higgs_tune":
                # `from higgs_tune import tiny`: each name may be a top-level module
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            elif target.startswith("higgs_tune."):
                yield node.lineno, target


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_module_has_a_layer():
    tops = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").is_file())
    }
    missing = sorted(tops - set(LAYERS))
    assert not missing, f"place these in a layer of LAYERS (tests/test_layers.py, docs/ARCHITECTURE.md): {missing}"


def test_imports_only_go_down():
    upward = []
    for path in _sources():
        rel = path.relative_to(PACKAGE).as_posix()
        own = LAYERS[_top(_module_name(path))]
        for line, target in _imports(path):
            top = _top(target)
            if top not in LAYERS:
                # `from higgs_tune import __version__` and the like: attributes of the package root
                continue
            if LAYERS[top] > own:
                upward.append(f"{rel}:{line} -> {target} (layer {LAYERS[top]} above {own})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "higgs_tune" / "data"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    f = src / "x.py"
    f.write_text(
        "from ..train import recipe\n\ndef g():\n    from higgs_tune.infer.generate import A\n    import "
        "higgs_tune.app.cli\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "higgs_tune"
    try:
        found = list(_imports(f))
    finally:
        PACKAGE = saved
    assert found == [(1, "higgs_tune.train"), (4, "higgs_tune.infer.generate"), (5, "higgs_tune.app.cli")]
