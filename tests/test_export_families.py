"""Export of the modern families, each artifact verified in its runtime by ``run_export`` on
inputs it never saw (unseen batch sizes, and with ``dynamic_size`` unseen resolutions, where
the graph must resize the position table in the source family's own way): timm's DINOv2 with
registers (bicubic + antialias, no prefix rows), SigLIP's attention-pooling head, CLIP's
QuickGELU and pre-norm; the original DINOv2 at a fixed resolution, and its refusal of
``--dynamic-size``. The figures come back in the results, and the checks are asserted here."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from _vitconv_cli.main import main
from conftest import seeded
from timm_import import import_timm
from vitconv.runtime.export import ExportPlan, run_export
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions

SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=8)


@pytest.mark.parametrize("arch,unsaid", [
    ("vit_small_patch14_reg4_dinov2", {}),
    ("vit_base_patch16_siglip_224", {"act": "gelu"}),  # timm's SigLIP towers: exact or tanh GELU
    ("vit_base_patch16_clip_quickgelu_224", {"act": "quick_gelu", "norm_eps": 1e-5}),
])
def test_timm_family_exports_to_onnx_with_dynamic_size(arch, unsaid, tmp_path):
    timm = import_timm()
    model = seeded(timm.create_model(arch, pretrained=False, **SMALL), scale=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors", ConvertOptions(overrides=unsaid))
    (result,) = run_export(tmp_path / "c.safetensors", ExportPlan(onnx=tmp_path / "m.onnx", dynamic_size=True))
    assert result.ok and {p.size for p in result.parity} == {32, 40, 56}
    assert "position table at other sizes: bicubic with antialiasing, as timm" in result.notes, result.notes
    assert max(p.max_abs for p in result.parity) <= 1e-4
    if arch.endswith("reg4_dinov2"):  # the graph follows timm at an unseen size, not just itself
        import onnxruntime as ort

        timm_dyn = seeded(timm.create_model(arch, pretrained=False, dynamic_img_size=True, **SMALL), scale=0.2)
        x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
        got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            assert abs(got - timm_dyn(x).numpy()).max() <= 1e-4


def _dinov2_hub(tmp_path):
    from test_original_families import _dinov2

    model = seeded(_dinov2())
    torch.save(model.state_dict(), tmp_path / "d.pth")
    return model


def test_original_dinov2_exports_at_a_fixed_resolution(tmp_path):
    model = _dinov2_hub(tmp_path)
    results = run_export(tmp_path / "d.pth", ExportPlan(onnx=tmp_path / "d.onnx", torchscript=tmp_path / "d.ts",
                                                        image_size=48))
    assert all(r.ok for r in results) and {p.size for r in results for p in r.parity} == {48}
    import onnxruntime as ort

    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    got = ort.InferenceSession(str(tmp_path / "d.onnx")).run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():  # DINOv2's own +0.1-offset resize, baked into the 48 px graph
        assert abs(got - model(x).numpy()).max() <= 1e-4


def test_original_dinov2_refuses_dynamic_size_in_one_line(tmp_path):
    _dinov2_hub(tmp_path)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "d.pth"), "--onnx", str(tmp_path / "d.onnx"),
                                  "--dynamic-size"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "scale_factor (g + 0.1) / M" in r.stderr
    assert not (tmp_path / "d.onnx").exists()


def test_fp16_onnx_keeps_the_rotary_angles_float32(tmp_path):
    """--fp16 rounds the weights and activations, not the rotary angles: every Sin and Cos reads
    angles computed in float32 from the patch indices, with no float16 value on the way (timm and
    the canonical model compute them in float32; at a 48 x 48 grid the angles reach 47 rad, where
    float16's spacing is 1/32 rad). The graph check is what fails on a float16 angle; on this
    one-block model the error that makes is below the weights' own rounding, so the figure after
    it is a bound (the graph as close to the float32 model as the weights rounded to float16)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from vitconv.conversion.loading import load

    timm = import_timm()
    model = seeded(timm.create_model("vit_small_patch16_rope_ape_224", pretrained=False,
                                     **{**SMALL, "depth": 1}), scale=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors")
    (result,) = run_export(tmp_path / "c.safetensors", ExportPlan(onnx=tmp_path / "h.onnx", fp16=True,
                                                                  dynamic_size=True))
    assert result.ok
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "h.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    made = {o: n for n in graph.node for o in n.output}
    angles = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert angles
    todo, seen = list(angles), set()
    while todo:  # back from each angle op to the integer indices
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        floats = [i for i in node.input if types.get(i) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        assert all(types[i] == onnx.TensorProto.FLOAT for i in floats), (node.op_type, node.name, floats)
        todo += [made[i] for i in floats if i in made]
    x = (torch.rand(4, 3, 384, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    with torch.no_grad():
        want = load(tmp_path / "c.safetensors")(x).numpy()
        rounded = load(tmp_path / "c.safetensors").half().float()(x).numpy()  # the weights' own rounding
    got = ort.InferenceSession(str(tmp_path / "h.onnx")).run(None, {"pixel_values": x.numpy()})[0]
    floor = np.abs(rounded - want).mean()
    assert np.abs(got - want).mean() <= 1.5 * floor, (np.abs(got - want).mean(), floor)
