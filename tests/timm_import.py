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
from vitconv.conversion.options import ConvertOptions


def import_timm():
    """The real ``timm`` package, or a skip naming why (CI installs it with ``--no-deps``)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        skip_unless_installed("timm not installed (pip install --no-deps timm==1.0.31, as .ci/run does)")
    with torchvision_placeholder():
        import timm
    return timm


def assert_timm_round_trip(tmp_path, name: str, kwargs: dict, model, sizes, report) -> None:
    """What every timm family test checks after reading ``tmp_path/src.safetensors`` (``model``'s
    state dict, built as ``create_model(name, **kwargs)``) into ``tmp_path/c.safetensors``
    (``report``): written back to timm it loads strictly, bit for bit; a timm directory rebuilds
    the same function from its ``config.json`` alone (at ``sizes``) and reads back as the same config."""
    import torch
    from safetensors.torch import load_file

    from conftest import close_to, images
    from vitconv.conversion.pipeline import convert, open_checkpoint

    timm = import_timm()
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(tmp_path / "src.safetensors"), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timm.create_model(name, pretrained=False, **kwargs).load_state_dict(b, strict=True)
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        for h, w in sizes:
            close_to(built(images(h, w)), model(images(h, w)))
    with open_checkpoint(tmp_path / "tdir") as again:
        assert again.config == report.config
