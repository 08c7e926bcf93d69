"""The Google table: inference from shapes, strict audit, and bitwise round trips."""

from __future__ import annotations

import numpy as np
import pytest

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.formats.base import DictSource
from vitconv.formats.npz import NpzSource
from vitconv.model import parameter_shapes
from vitconv.conversion.pipeline import LAYOUTS, convert, map_state, open_checkpoint
from vitconv.layouts import Probe, google
from conftest import GOOGLE_CASES, golden_path

CHECKPOINTS = sorted({c["checkpoint"] for c in GOOGLE_CASES.values()})


def google_shapes(cfg: ViTConfig) -> dict:
    """Google key shapes for ``cfg`` written out by hand from vit_jax's module definitions,
    independent of the rule table."""
    D, H, hd, M, p = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.patch_size
    s = {"embedding/kernel": (p, p, cfg.embed_in_chans, D), "embedding/bias": (D,),
         "Transformer/posembed_input/pos_embedding": (1, cfg.num_tokens, D),
         "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,)}
    for i in range(cfg.depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            s[b + ln + "/scale"] = s[b + ln + "/bias"] = (D,)
        for n in ("query", "key", "value"):
            s[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (D, H, hd)
            s[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = (H, hd)
        s[b + "MultiHeadDotProductAttention_1/out/kernel"] = (H, hd, D)
        s[b + "MultiHeadDotProductAttention_1/out/bias"] = (D,)
        s[b + "MlpBlock_3/Dense_0/kernel"], s[b + "MlpBlock_3/Dense_0/bias"] = (D, M), (M,)
        s[b + "MlpBlock_3/Dense_1/kernel"], s[b + "MlpBlock_3/Dense_1/bias"] = (M, D), (D,)
    if cfg.classifier == "token":
        s["cls"] = (1, 1, D)
    if cfg.representation_size:
        s["pre_logits/kernel"], s["pre_logits/bias"] = (D, cfg.representation_size), (cfg.representation_size,)
    if cfg.num_classes:
        s["head/kernel"], s["head/bias"] = (cfg.head_in_dim, cfg.num_classes), (cfg.num_classes,)
    if cfg.resnet_layers:
        w = cfg.resnet_width
        s["conv_root/kernel"] = (7, 7, cfg.in_chans, w)
        s["gn_root/scale"] = s["gn_root/bias"] = (1, 1, 1, w)
        cin = w
        for si, n in enumerate(cfg.resnet_layers):
            f = w * 2 ** si
            for u in range(n):
                pre = f"block{si + 1}/unit{u + 1}/"
                if u == 0:
                    s[pre + "conv_proj/kernel"] = (1, 1, cin, 4 * f)
                    s[pre + "gn_proj/scale"] = s[pre + "gn_proj/bias"] = (1, 1, 1, 4 * f)
                s[pre + "conv1/kernel"] = (1, 1, cin, f)
                s[pre + "conv2/kernel"] = (3, 3, f, f)
                s[pre + "conv3/kernel"] = (1, 1, f, 4 * f)
                for g, c in (("gn1", f), ("gn2", f), ("gn3", 4 * f)):
                    s[pre + g + "/scale"] = s[pre + g + "/bias"] = (1, 1, 1, c)
                cin = 4 * f
    return s


REAL = {
    "ViT-Ti/16": ViTConfig(width=192, depth=12, num_heads=3, mlp_dim=768),
    "ViT-B/16": ViTConfig(),
    "ViT-B/16-in21k": ViTConfig(representation_size=768, num_classes=21843),
    "ViT-S/32@384": ViTConfig(image_size=384, patch_size=32, width=384, num_heads=6, mlp_dim=1536),
    "ViT-L/16": ViTConfig(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "ViT-S/16-gap": ViTConfig(width=384, num_heads=6, mlp_dim=1536, classifier="gap", class_token=False),
    "R50+ViT-B/16@384": ViTConfig(image_size=384, patch_size=1, resnet_layers=(3, 4, 9)),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_infers_real_architectures_from_shapes_alone(name):
    cfg = REAL[name]
    assert google.infer_config(Probe(google_shapes(cfg))) == cfg


def test_published_parameter_counts():
    """ViT-B/16 (224 px, 1000 classes): 86,567,656, the exact published count. R50+ViT-B/16
    (384 px, 1000 classes, Google's (3, 4, 9) stem): 98,950,952 here; timm lists
    ``vit_base_r50_s16_384`` as 98.95 M (rounded), so that is what we can hold it to.
    Counts come from the hand-written Google shapes and from the model, independently."""
    def count(shapes):
        return sum(int(np.prod(s)) for s in shapes.values())

    b16 = REAL["ViT-B/16"]
    assert count(google_shapes(b16)) == count(parameter_shapes(b16)) == 86_567_656
    r50 = REAL["R50+ViT-B/16@384"]
    n = count(google_shapes(r50))
    assert n == count(parameter_shapes(r50))
    assert round(n / 1e6, 2) == 98.95


def test_rule_table_produces_every_model_parameter_exactly_once():
    from vitconv.layouts.table import expand_rules

    for cfg in REAL.values():
        rules = expand_rules(google.TABLE, cfg)
        names = [r.canonical for r in rules]
        assert len(names) == len(set(names))
        assert set(names) == set(parameter_shapes(cfg))
        keys = [k for r in rules for k in r.source]
        assert len(keys) == len(set(keys)) and set(keys) == set(google_shapes(cfg))


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_npz_to_canonical_to_npz_is_bitwise(ckpt, tmp_path):
    src = NpzSource(golden_path(ckpt))
    with open_checkpoint(golden_path(ckpt)) as c:
        back = map_state(c.state_dict(), c.config, LAYOUTS["google"])
    assert sorted(back) == sorted(src.keys())
    for k in src.keys():
        a = src.get(k)
        assert back[k].shape == a.shape and back[k].dtype == a.dtype, k
        assert back[k].tobytes() == a.tobytes(), k
    # and through a file written by vitconv, read again
    out = tmp_path / "back.npz"
    convert(golden_path(ckpt), out)
    again = NpzSource(out)
    assert all(again.get(k).tobytes() == src.get(k).tobytes() for k in src.keys())


def _golden_arrays(ckpt="jax/tiny_token_p8_32.npz"):
    src = NpzSource(golden_path(ckpt))
    return {k: src.get(k) for k in src.keys()}


@pytest.mark.parametrize("prefix", ["opt/target/", "params/"])
def test_accepts_nested_prefixes(prefix):
    arrays = {prefix + k: v for k, v in _golden_arrays().items()}
    arrays["opt/state/step"] = np.zeros((), np.int32)  # optimizer state beside the params
    with open_checkpoint("x.npz", source=DictSource(arrays, "x.npz")) as c:
        assert c.config.depth == 2 and len(c.state_dict()) == len(parameter_shapes(c.config))
        assert c.ignored == ["opt/state/step"]
        assert any(n.startswith("1 keys outside") for n in c.notes)


def test_blocks_are_ordered_by_number_not_by_name():
    """With 12 blocks the file lists encoderblock_10 before encoderblock_2; the mapping
    must still put Google's block 10 into canonical block 10."""
    cfg = ViTConfig(image_size=16, patch_size=8, width=8, depth=12, num_heads=2, head_dim=4,
                    mlp_dim=8, num_classes=3)
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(google_shapes(cfg).items())}
    assert list(arrays).index("Transformer/encoderblock_10/LayerNorm_0/bias") < \
        list(arrays).index("Transformer/encoderblock_2/LayerNorm_0/bias")
    with open_checkpoint("x.npz", source=DictSource(arrays, "x.npz")) as c:
        sd = c.state_dict()
    for i in (2, 10):
        np.testing.assert_array_equal(sd[f"blocks.{i}.norm1.bias"],
                                      arrays[f"Transformer/encoderblock_{i}/LayerNorm_0/bias"])


def test_audit_lists_unused_and_missing_keys():
    arrays = _golden_arrays()
    arrays["Transformer/encoderblock_0/extra/kernel"] = np.zeros((2,), np.float32)
    with pytest.raises(MappingError, match=r"1 unused key\(s\): Transformer/encoderblock_0/extra/kernel"):
        open_checkpoint("x.npz", source=DictSource(arrays, "x.npz"))
    arrays = _golden_arrays()
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    with pytest.raises(MappingError, match="missing 1 key.*encoderblock_1/MlpBlock_3/Dense_0/bias"):
        open_checkpoint("x.npz", source=DictSource(arrays, "x.npz"))


def test_wrong_shape_is_named():
    arrays = _golden_arrays()
    arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"] = np.zeros((96, 40), np.float32)
    with pytest.raises(MappingError, match="Dense_1/kernel"):
        open_checkpoint("x.npz", source=DictSource(arrays, "x.npz")).state_dict()


def test_library_and_cli_start_without_torch():
    """torch (~1.9 s and ~190 MiB to import here) loads only when a model is built or mapped:
    ``import vitconv`` and every CLI module, ``--help`` included, start without it."""
    import subprocess
    import sys

    code = ("import sys, vitconv, vitconv.tools.inspection, vitconv.verification.verify, vitconv.runtime.export, vitconv.tools.bench, "
            "_vitconv_cli.main; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
