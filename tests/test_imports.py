"""The package's import structure: no cycles among vitconv's (and the CLI's) modules, and an
import of one of them inside a function only where it defers torch, whose import costs about
1.9 s and 190 MiB here (``import vitconv`` and the CLI start without it)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from conftest import ROOT

PACKAGES = {"vitconv": ROOT / "vitconv", "_vitconv_cli": ROOT / "cli"}


def _modules() -> Dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> List[str]:
    """The internal modules an import statement loads (a name that is a submodule counts)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    names_only = len(found) < len(node.names)  # some names are attributes of the target itself
    return found + ([target] if target in MODULES and names_only else [])


def _imports() -> Tuple[Dict[str, Set[str]], List[Tuple[str, str, int]], Set[str]]:
    """Module-level internal imports, function-level ones ``(module, target, line)``, and the
    modules that import torch at module level."""
    top: Dict[str, Set[str]] = {m: set() for m in MODULES}
    inner: List[Tuple[str, str, int]] = []
    torch_at_top: Set[str] = set()
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top[module].update(_resolve(module, node, is_package))
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n == "torch" or n.startswith("torch.") for n in names) and not getattr(node, "level", 0):
                    torch_at_top.add(module)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inner += [(module, t, node.lineno) for t in _resolve(module, node, is_package)]
    return top, inner, torch_at_top


def test_no_import_cycles():
    top, _, _ = _imports()
    # a package imports its own submodules by design (registration); leave those edges out
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in top.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_inside_functions_only_defer_torch():
    top, inner, torch_at_top = _imports()
    heavy = set(torch_at_top)
    changed = True
    while changed:  # a module that imports a torch module at top is one too
        changed = False
        for m, ts in top.items():
            if m not in heavy and ts & heavy:
                heavy.add(m)
                changed = True
    assert {"vitconv.model", "vitconv.conversion.loading"} <= heavy
    # three more, each for its reason: vitconv/__init__'s __getattr__ keeps the pipeline (and
    # vitconv.convert's model-card layer over it) out of `import vitconv.verification.references.google_numpy` (the
    # independent reference); vitconv/runtime/export/__init__'s keeps every exporter out of a
    # conversion that only needs export.common's comparison (through verify); and `python -m
    # vitconv` reports a missing click (optional for the library) instead of a traceback
    excused = {("vitconv", "vitconv.conversion.pipeline"), ("vitconv", "vitconv.conversion.service"),
               ("vitconv.runtime.export", "vitconv.runtime.export.run"), ("vitconv.__main__", "_vitconv_cli.main")}
    bad = [f"{m}:{line} imports {t}" for m, t, line in inner if t not in heavy and (m, t) not in excused]
    assert not bad, bad
    light = {m for m in MODULES if m not in heavy}
    assert {"vitconv.conversion.pipeline", "vitconv.layouts.layout", "_vitconv_cli.main"} <= light
