"""A module named at the top of another and loaded on its first use: how torch stays out of a
conversion while the modules that can also run a model still say, at their top, what they use.

``import torch`` costs 1.3-1.9 s and 190 MiB here; a conversion needs none of it, yet the convert
service can verify what it wrote, and ``vitconv.load`` builds the torch model. A module that
needs a torch-side module only on some calls names it once, at its top::

    loading = lazy_module("vitconv.conversion.loading")   # torch, on first use

    def verify(...):
        model = loading.StreamedModel(...)

Every import of the package stays visible in one place per module (``tests/test_imports.py``
reads these calls as import edges: no cycle through them either), none hides inside a function,
and the first attribute looked up imports the module for real, under the interpreter's import
lock, so threads may race to it. (The standard library's ``importlib.util.LazyLoader`` does the
same with a module object, but is not thread-safe before Python 3.12.)
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module ``name`` until an attribute is looked up; then it is imported."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __setattr__(self, attr: str, value) -> None:
        raise AttributeError(f"set {attr!r} on the module {self._name!r} itself, not on its lazy handle")

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"

    @property
    def module(self) -> ModuleType:
        """The module itself, imported now."""
        return importlib.import_module(self._name)


def lazy_module(name: str) -> LazyModule:
    """A handle on the module ``name`` (absolute) that imports it on first attribute use."""
    return LazyModule(name)
