"""How the ``families/`` golden cases were made: each checkpoint is built and run by its own
library (timm, OpenAI's ``clip/model.py``, the original DINOv2 code), never by vitconv, and
recorded with ``vitconv.verification.golden.add_case`` (which refuses a case vitconv does not reproduce).

Run once, from the project root, with the libraries installed as ``.ci/run`` installs them:

    python golden/families/make.py            # every case
    python golden/families/make.py --2025     # the 2025 generation's alone
    python golden/families/make.py --2025 timm_eva02_p8_32   # one of them

Versions used for the files in git: torch 2.13.0 (CPU), timm 1.0.31, clip-anytorch 2.6.0,
dinov2 0.0.1.dev2. The inputs are the Google cases' ``jax/inputs_{32,48}.npy`` (NHWC).
Weights: every parameter N(0, 0.3^2) from ``torch.Generator().manual_seed(seed)`` except the
LayerScale vectors, log-uniform over 2e-4..11 (the range of trained DINOv2 scales), so every
feature moves the output far above float32 rounding.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent
ROOT = GOLDEN.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # timm without torchvision, as the tests import it

from timm_import import import_timm  # noqa: E402

from vitconv.verification.golden import add_case  # noqa: E402

# heads of width 64, as every released model of these families has: a bare state dict does not
# record the head count, and vitconv (like timm's and OpenAI's own loaders) assumes that width
SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0)


def far_from_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.exp(torch.empty(p.shape).uniform_(math.log(2e-4), math.log(11.0), generator=g)))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def inputs(size: int) -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / "jax" / f"inputs_{size}.npy").transpose(0, 3, 1, 2).copy())


def record(name: str, checkpoint: Path, size: int, logits: torch.Tensor, source: str, image_size=None,
           issue: str = "modern families", overrides=None) -> None:
    out = HERE / f"{name}.logits.npy"
    np.save(out, logits.detach().float().numpy())
    result = add_case(name, checkpoint, GOLDEN / "jax" / f"inputs_{size}.npy", {"logits": out}, source,
                      directory=GOLDEN, image_size=image_size, issue=issue, accept=True, overrides=overrides)
    worst = max(f.max_abs for f in result.figures if f.what != "top1")
    print(f"{name}: recorded, max abs {worst:.2e}")


def timm_cases() -> None:
    timm = import_timm()
    dino = far_from_init(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
                                           dynamic_img_size=True, **SMALL), seed=1)
    path = HERE / "timm_dinov2_reg4_p8_32.safetensors"
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, path)
    with torch.no_grad():
        record("timm_dinov2_reg4_p8_32", path, 32, dino(inputs(32)),
               "timm 1.0.31 vit_small_patch14_reg4_dinov2 (width 128, 2 heads, depth 2, MLP ratio 2, patch 8, 32 px) forward, float32 CPU")
        record("timm_dinov2_reg4_p8_32_to_48", path, 48, dino(inputs(48)),
               "the same timm model with dynamic_img_size=True run at 48 px: timm's own bicubic antialiased "
               "resize of a table without prefix rows", image_size=48)
    siglip = far_from_init(timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=10,
                                             **SMALL), seed=2)
    path = HERE / "timm_siglip_map_p8_32.safetensors"
    save_file({k: v.contiguous() for k, v in siglip.state_dict().items()}, path)
    with torch.no_grad():
        record("timm_siglip_map_p8_32", path, 32, siglip(inputs(32)),
               "timm 1.0.31 vit_base_patch16_siglip_224 (MAP head, tanh GELU) with a 10-class head, float32 CPU")


def openai_clip_case() -> None:
    spec = importlib.util.find_spec("clip")
    mspec = importlib.util.spec_from_file_location(
        "_openai_clip_model", os.path.join(spec.submodule_search_locations[0], "model.py"))
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    clip = far_from_init(module.VisionTransformer(input_resolution=32, patch_size=8, width=128, layers=2, heads=2,
                                                  output_dim=16), seed=3)
    path = HERE / "openai_clip_p8_32.pt"
    torch.save(clip.state_dict(), path)
    with torch.no_grad():
        record("openai_clip_p8_32", path, 32, clip(inputs(32)),
               "OpenAI CLIP clip/model.py VisionTransformer (clip-anytorch 2.6.0; QuickGELU, ln_pre, proj) "
               "image embedding, float32 CPU")


def dinov2_case() -> None:
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = far_from_init(DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2,
                                                ffn_layer="swiglufused", init_values=1.0, block_chunks=0,
                                                block_fn=partial(Block, attn_class=MemEffAttention)), seed=4)
    path = HERE / "dinov2_swiglu_p8_32.pth"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        record("dinov2_swiglu_p8_32_to_48", path, 48, model(inputs(48)),
               "the original DINOv2 DinoVisionTransformer (PyPI dinov2 0.0.1.dev2; SwiGLU, LayerScale) run at "
               "48 px: its own interpolate_pos_encoding with the 0.1 scale offset, float32 CPU", image_size=48)


def generation_2025_cases(only=()) -> None:
    """The 2025 generation, each built and run by timm 1.0.31 at width 128, 2 heads of 64, depth 2,
    patch 8, 32 px, and (where timm runs any size) at 48 px with ``dynamic_img_size=True``."""
    timm = import_timm()
    small = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
    cases = (
        ("timm_dinov3_p8_32", "vit_small_patch16_dinov3", dict(dynamic_img_size=True), 11, None,
         "DINOv3's rotary positions (periods from theta 100, per-axis normalised patch centres), 4 storage "
         "tokens, LayerScale, no position table, mean pooling"),
        ("timm_dinov3_qkvb_p8_32", "vit_small_patch16_dinov3_qkvb", dict(dynamic_img_size=True), 12,
         {"classifier": "gap"}, "the same with q/k/v biases; its keys fit LingBot (class-token pooling) too: "
         "the case says classifier=gap, as a user must"),
        ("timm_beit_p8_32", "beit_base_patch16_224", dict(num_classes=10), 13, None,
         "BEiT: a relative position bias table per block, q and v biases, LayerScale gamma_1/gamma_2, "
         "mean pooling with fc_norm, a 10-class head"),
        ("timm_aimv2_p8_32", "aimv2_large_patch14_224", dict(dynamic_img_size=True), 14, None,
         "AIMv2: RMSNorm (eps 1e-5 from the architecture table), no biases but the patch projection's, "
         "unpacked SwiGLU, a norm on the patch embeddings, the tokens' mean"),
        ("timm_naflex_siglip_p8_32", "naflexvit_base_patch16_siglip", dict(), 15, None,
         "SigLIP 2's NaFlexVit tower on a whole image: tanh GELU, MAP head, its learned square table"),
        ("timm_eva02_p8_32", "eva02_tiny_patch14_224", dict(dynamic_img_size=True), 16, None,
         "EVA-02: EVA's axial rotary embeddings (rope 'cat', reference grid 16x16, interleaved), a position "
         "table, SwiGLU, q and v biases"),
    )
    for name, arch, extra, seed, told, what in cases:
        if only and name not in only:
            continue
        model = far_from_init(timm.create_model(arch, pretrained=False, **small, **extra), seed=seed)
        path = HERE / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        source = (f"timm 1.0.31 {arch} (width 128, 2 heads, depth 2, patch 8, 32 px) forward, float32 CPU: {what}")
        with torch.no_grad():
            record(name, path, 32, model(inputs(32)), source, issue="2025 generation", overrides=told)
            if extra.get("dynamic_img_size"):
                record(name.replace("_32", "_32_to_48"), path, 48, model(inputs(48)),
                       f"the same timm model run at 48 px (dynamic_img_size=True): {what}", image_size=48,
                       issue="2025 generation", overrides=told)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--2025"]:  # only the cases added with the 2025 generation (or those named)
        generation_2025_cases(sys.argv[2:])
    else:
        timm_cases()
        openai_clip_case()
        dinov2_case()
        generation_2025_cases()
