"""Import the real ``timm`` on a machine without torchvision.

timm's model code (``VisionTransformer``, DeiT's ``VisionTransformerDistilled``) does not use
torchvision, but its package imports do (data transforms, ``FrozenBatchNorm2d``), and the only
torchvision wheel on this machine's index is built for CUDA and fails against the CPU torch.
While ``timm`` is imported, a placeholder answers for every ``torchvision`` name; the
placeholders are removed again afterwards, so other libraries (``transformers`` looks for
torchvision) never see them. Where a real torchvision is installed it is used as is.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from conftest import skip_unless_installed


class _Named(type):
    """Class attributes answer with their own name (``InterpolationMode.BICUBIC`` etc.)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class _Placeholder(metaclass=_Named):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision placeholder: not usable in these tests")


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Named(name, (_Placeholder,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def torchvision_placeholder():
    """Within this block every ``torchvision`` import is answered by a placeholder (unless a
    real torchvision is installed); afterwards the placeholders are gone again."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def import_timm():
    """The real ``timm`` package, or a skip naming why (CI installs it with ``--no-deps``)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        skip_unless_installed("timm not installed (pip install --no-deps timm==1.0.31, as .ci/run does)")
    with torchvision_placeholder():
        import timm
    return timm
