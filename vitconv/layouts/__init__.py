"""Name maps and layout transforms as data: one table per foreign layout, each row
invertible, so the same table reads and writes. Rules never open files.

Importing this package registers every layout: each family module of this package (every
module but the machinery in :data:`MACHINERY`) calls :func:`~vitconv.layouts.layout.register`
for its own when imported here, in name order, so a new family is a new module and nothing
else. :data:`LAYOUTS` then holds them all; where several share a ``--to`` name, their
``write_rank`` says which is tried first.
"""

import importlib
import pkgutil

from vitconv.layouts.table import Carry, Rule, expand_rules
from vitconv.layouts.layout import LAYOUTS, Layout, Probe, detect_layout, targets

#: The modules of this package that hold no layout of their own.
MACHINERY = frozenset({"inference", "layout", "table", "transforms", "unsupported"})

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in MACHINERY:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Carry", "Rule", "expand_rules", "LAYOUTS", "Layout", "Probe", "detect_layout", "targets"]
