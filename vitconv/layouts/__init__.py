"""Name maps and layout transforms as data: one table per foreign layout, each row
invertible, so the same table reads and writes. Rules never open files.

Importing this package registers every layout (each module calls
:func:`~vitconv.layouts.layout.register` for its own); :data:`LAYOUTS` then holds them all.
"""

from vitconv.layouts import (big_vision, canonical, clip, dinov2, google, hf, hf_aimv2, hf_clip, hf_dinov2, hf_dinov3,  # noqa: F401
               hf_siglip2, jeonsworld, lucidrains, timm, timm_eva, timm_naflexvit)  # (registration)
from vitconv.layouts import hf_beit, timm_beit  # noqa: F401 (registration; after hf and timm: --to tries plain ViTs first)
from vitconv.layouts import dinov3  # noqa: F401 (registration)
from vitconv.layouts.table import Carry, Rule, expand_rules
from vitconv.layouts.layout import LAYOUTS, Layout, Probe, detect_layout, targets

__all__ = ["Carry", "Rule", "expand_rules", "LAYOUTS", "Layout", "Probe", "detect_layout", "targets"]
