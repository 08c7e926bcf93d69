"""The package's import structure: no cycles among vitconv's (and the CLI's) modules, counting
the modules a module names for later (:func:`vitconv.lazy.lazy_module`), and no import of one
of them inside a function: each module says at its top what it uses. Modules that run a model
name torch's side with ``lazy_module`` (``import torch`` costs about 1.9 s and 190 MiB here;
``import vitconv``, the CLI and every conversion start without it)."""

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


def _lazy_target(node: ast.stmt) -> str | None:
    """``name = lazy_module("vitconv.x")`` at a module's top: the module it names."""
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
        fn, args = node.value.func, node.value.args
        if isinstance(fn, ast.Name) and fn.id == "lazy_module" and args and isinstance(args[0], ast.Constant):
            return args[0].value
    return None


def _imports() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]], List[Tuple[str, str, int]], Set[str]]:
    """Module-level internal imports, modules named for later use, function-level internal
    imports ``(module, target, line)``, and the modules that import torch at module level."""
    top: Dict[str, Set[str]] = {m: set() for m in MODULES}
    lazy: Dict[str, Set[str]] = {m: set() for m in MODULES}
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
            target = _lazy_target(node)
            if target is not None:
                assert target in MODULES, f"{module}: lazy_module({target!r}) names no module of the package"
                lazy[module].add(target)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inner += [(module, t, node.lineno) for t in _resolve(module, node, is_package)]
    return top, lazy, inner, torch_at_top


def test_no_import_cycles_counting_lazy_ones():
    top, lazy, _, _ = _imports()
    # a package imports its own submodules by design (registration); leave those edges out
    graph = {m: {t for t in top[m] | lazy[m] if not t.startswith(m + ".")} for m in top}
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


def test_no_internal_import_inside_a_function():
    _, _, inner, _ = _imports()
    bad = [f"{m}:{line} imports {t}" for m, t, line in inner]
    assert not bad, bad


def test_conversion_and_the_cli_start_without_torch():
    top, _, _, torch_at_top = _imports()
    heavy = set(torch_at_top)
    changed = True
    while changed:  # a module that imports a torch module at its top is one too
        changed = False
        for m, ts in top.items():
            if m not in heavy and ts & heavy:
                heavy.add(m)
                changed = True
    assert {"vitconv.model", "vitconv.conversion.loading"} <= heavy
    light = {m for m in MODULES if m not in heavy}
    assert {"vitconv", "vitconv.conversion.pipeline", "vitconv.conversion.service", "vitconv.layouts.layout",
            "vitconv.verification.verify", "_vitconv_cli.main", "_vitconv_cli.convert", "_vitconv_cli.npz2pt",
            "_vitconv_cli.inspect"} <= light


def test_the_cli_sets_openblas_spin_before_numpy_loads():
    """cli/main.py sets OPENBLAS_THREAD_TIMEOUT for OpenBLAS to read when numpy loads: so numpy
    must not be loaded yet when it is set; a user's own value is kept."""
    import os
    import subprocess
    import sys

    probe = ("import os, sys; import _vitconv_cli.main; "
             "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], 'numpy' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    for given, expected in ((None, "4 False"), ("12", "12 False")):
        run_env = env if given is None else {**env, "OPENBLAS_THREAD_TIMEOUT": given}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
