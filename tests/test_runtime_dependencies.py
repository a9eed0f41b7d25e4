"""The runtime install (``pip install -e .``, no extras) holds every module loraforge imports.

A green suite with the test extras installed once hid a missing runtime dependency (transformers
needs ``accelerate`` for GGUF files, and only peft pulled it in). This test reads every import in
the package, maps it to the distribution that provides it, and checks that the distribution is a
runtime requirement of loraforge (directly or through another runtime requirement). Imports inside
``try: ... except ImportError`` are optional by construction; the few optional imports that are
not (the Triton kernels, only reached on a GPU) are listed with the reason. ``.ci/run`` also runs
the demo in a fresh venv with the runtime requirements alone.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loraforge"
# imported without a try/except, yet optional: reached only where the extra is installed
OPTIONAL = {
    "triton": "GPU kernels; loraforge.kernels.dispatch checks for triton before any kernel module runs",
}
# needed at run time although loraforge never imports them itself
INDIRECT = {
    "accelerate": "transformers refuses from_pretrained(gguf_file=...) without it",
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, guarded by an ImportError handler) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in guarded) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in guarded))
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
               for n in names)


def runtime_closure() -> set[str]:
    """Normalised names of loraforge's runtime requirements and theirs, no extras."""
    seen: set[str] = set()
    todo = ["loraforge"]
    while todo:
        name = todo.pop()
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            if "extra ==" in spec.replace('"', "'").replace("extra==", "extra =="):
                continue
            if ";" in spec and not _marker_holds(spec.split(";", 1)[1]):
                continue
            dist = _normal(re.split(r"[\s\[<>=!~;(]", spec, maxsplit=1)[0])
            if dist not in seen:
                seen.add(dist)
                todo.append(dist)
    return seen


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate({"extra": ""})


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_module_is_a_runtime_requirement():
    providers = importlib.metadata.packages_distributions()
    closure = runtime_closure()
    assert "torch" in closure and "transformers" in closure  # the closure is read at all
    missing = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, guarded in imports(path):
            if guarded or module in sys.stdlib_module_names or module in ("loraforge", "__future__"):
                continue
            if module in OPTIONAL:
                continue
            dists = {_normal(d) for d in providers.get(module, [module])}
            if not dists & closure:
                missing.setdefault(module, []).append(str(path.relative_to(PACKAGE.parent)))
    assert not missing, f"imported but not a runtime dependency (add them to pyproject.toml): {missing}"


def test_indirect_runtime_needs_are_requirements():
    closure = runtime_closure()
    absent = {name: why for name, why in INDIRECT.items() if _normal(name) not in closure}
    assert not absent, f"runtime needs missing from pyproject.toml's dependencies: {absent}"


def test_the_scan_sees_a_missing_dependency(tmp_path):
    """The check above can fail: a module importing a package nothing requires is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\ntry:\n    import pyarrow\nexcept ImportError:\n    pass\n"
                     "def f():\n    import peft\n")
    found = dict(imports(probe))
    assert found == {"torch": False, "pyarrow": True, "peft": False}
    assert "peft" not in runtime_closure()  # a test extra, not a runtime requirement
