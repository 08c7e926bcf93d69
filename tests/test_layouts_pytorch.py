"""timm, timm-derived (PositionEmbs), jeonsworld and old vit-pytorch layouts: each read onto the
canonical model computes what an independent implementation of that layout computes, and
source -> canonical -> source is bitwise. The timm checks here run against
``layout_refs.TimmLikeViT``, written from timm's semantics; ``test_timm_real.py`` repeats them
against the real timm, which needs a torchvision placeholder to import here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitconv.conversion.loading import build_model
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import open_checkpoint, to_layout
from conftest import CASES, golden_expected, golden_input, golden_path, read
from layout_refs import JeonsworldViT, PrenormViT, TimmLikeViT

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """LayerNorm affine parameters default to 1/0; randomise all so every mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _save(model, path):
    torch.save(model.state_dict(), path)
    return path


def _check(model, path, layout, heads, expect_cfg=None, overrides=None):
    name, cfg, state, _notes = read(path, num_heads=heads, overrides=overrides)
    assert name == layout
    for k, v in (expect_cfg or {}).items():
        assert getattr(cfg, k) == v, k
    with torch.no_grad():
        ref = model(X).numpy()
        got = build_model(cfg, state)(X).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    # source -> canonical -> source, bitwise
    target = "lucidrains_prenorm" if layout == "lucidrains_prenorm" else layout
    _, back = to_layout(state, cfg, target, "pt")
    src = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(back) == sorted(src)
    for k in src:
        assert back[k].dtype == src[k].dtype and back[k].shape == src[k].shape
        assert back[k].tobytes() == src[k].tobytes(), k
    return cfg


@pytest.mark.parametrize("kw,expect", [
    (dict(), dict(classifier="token", final_norm="encoder", act="gelu", norm_eps=1e-6)),
    (dict(class_token=False, fc_norm=True), dict(classifier="gap", final_norm="pooled")),
    # timm's gap towers without fc_norm (plain and SigLIP) use exact or tanh GELU: said
    (dict(class_token=False), dict(classifier="gap", final_norm="encoder", act="gelu")),
    (dict(rep=24), dict(representation_size=24)),
])
def test_timm_matches_reference_and_round_trips(tmp_path, kw, expect):
    m = _randomize(TimmLikeViT(**kw), 1)
    _check(m, _save(m, tmp_path / "t.pth"), "timm", 3, expect,
           {"act": "gelu"} if kw == dict(class_token=False) else None)


def test_timm_posembs_variant(tmp_path):
    m = _randomize(TimmLikeViT(posembs=True, rep=16), 2)
    _check(m, _save(m, tmp_path / "t.pth"), "timm_posembs", 3, dict(representation_size=16))


def test_jeonsworld_matches_reference_and_round_trips(tmp_path):
    m = _randomize(JeonsworldViT(), 3)
    _check(m, _save(m, tmp_path / "j.pth"), "jeonsworld", 3, dict(act="gelu", classifier="token"))


def test_lucidrains_prenorm_matches_reference_and_round_trips(tmp_path):
    m = _randomize(PrenormViT(), 4)  # inner dim 2*64 = 128 != width 40: heads inferable
    cfg = _check(m, _save(m, tmp_path / "l.pth"), "lucidrains_prenorm", None,
                 dict(num_heads=2, head_dim=64, width=40, qkv_bias=False, norm_eps=1e-5, final_norm="encoder"))
    assert cfg.attn_dim != cfg.width


def test_google_golden_written_as_timm_runs_in_timm_with_tanh_gelu(tmp_path):
    """Golden .npz -> timm keys; the timm model built with act_layer tanh-GELU (as the convert
    report says) reproduces Google's own logits."""
    case = CASES["tiny_token_p8_32"]
    with open_checkpoint(golden_path(case["checkpoint"])) as c:
        _, arrays = to_layout(c.state_dict(), c.config, "timm")
    m = TimmLikeViT(act="gelu_tanh").eval()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    with torch.no_grad():
        got = m(golden_input(case)).numpy()
    assert np.abs(got - golden_expected(case, "logits")).max() <= 2e-5
    m_exact = TimmLikeViT(act="gelu").eval()  # timm's default: a different function
    m_exact.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    with torch.no_grad():
        assert np.abs(m_exact(golden_input(case)).numpy() - golden_expected(case, "logits")).max() > 1e-4


def test_hybrid_golden_round_trips_through_jeonsworld_bitwise(tmp_path):
    case = CASES["tiny_r50_32"]
    with open_checkpoint(golden_path(case["checkpoint"])) as c:
        state, config = c.state_dict(), c.config
    _, arrays = to_layout(state, config, "jeonsworld", "pt")
    assert "transformer.embeddings.hybrid_model.body.block1.unit1.downsample.weight" in arrays
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "r.pth")
    _, cfg, back, notes = read(tmp_path / "r.pth", num_heads=config.num_heads)
    assert cfg.resnet_layers == config.resnet_layers
    assert any("Google's ResNet stem" in n for n in notes)
    for k in state:
        assert back[k].tobytes() == state[k].tobytes(), k


def test_inconsistent_distillation_and_unknown_heads_are_refused(tmp_path):
    m = TimmLikeViT()
    sd = m.state_dict()
    sd["dist_token"] = torch.zeros(1, 1, 48)  # a DeiT token, but no position row for it
    torch.save(sd, tmp_path / "d.pth")
    with pytest.raises(MappingError, match=r"pos_embed \(1, 17, 48\) holds neither 2 prefix row\(s\) plus a square grid nor a square grid alone"):
        read(tmp_path / "d.pth", num_heads=3)
    torch.save(m.state_dict(), tmp_path / "t.pth")
    with pytest.raises(MappingError, match="--num-heads"):  # 48-wide attention: not 64-dim heads
        read(tmp_path / "t.pth")


def test_num_heads_is_refused_where_the_file_records_the_heads(tmp_path):
    """convert and load share one rule: Google and canonical files record the heads in their
    shapes or config, so --num-heads is refused; a Hugging Face config.json that says
    otherwise is a contradiction, not something to note over."""
    from vitconv.conversion.loading import load
    from vitconv.errors import BadInputError
    from vitconv.conversion.pipeline import convert

    npz = golden_path("jax/tiny_token_p8_32.npz")
    for reader in (lambda p, h: read(p, num_heads=h), lambda p, h: load(p, num_heads=h)):
        with pytest.raises(BadInputError, match="google layout records the heads"):
            reader(npz, 3)
    convert(npz, tmp_path / "hf")
    with pytest.raises(BadInputError, match="num_heads=1, but the checkpoint records 3 heads"):
        read(tmp_path / "hf", num_heads=1)
