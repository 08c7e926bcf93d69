"""Import the real ``timm`` on a machine without torchvision.

timm's model code (``VisionTransformer``, DeiT's ``VisionTransformerDistilled``) does not use
torchvision, but its package imports do (data transforms, ``FrozenBatchNorm2d``), and the only
torchvision wheel on this machine's index is built for CUDA and fails against the CPU torch.
While ``timm`` is imported, a placeholder answers for every ``torchvision`` name; the
placeholders are removed again afterwards, so other libraries (``transformers`` looks for
torchvision) never see them. Where a real torchvision is installed it is used as is.
"""

from __future__ import annotations

import importlib.util
import sys

from conftest import skip_unless_installed
from vitconv.archs.generate import torchvision_placeholder  # noqa: F401 - the one placeholder; tests import it here


def import_timm():
    """The real ``timm`` package, or a skip naming why (CI installs it with ``--no-deps``)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        skip_unless_installed("timm not installed (pip install --no-deps timm==1.0.31, as .ci/run does)")
    with torchvision_placeholder():
        import timm
    return timm
