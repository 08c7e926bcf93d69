"""Typed row conditions (:class:`vitconv.layouts.table.When`) and typed ``Carry`` arguments.

A row's condition is an object, not a string to parse: a wrong field, a value of the wrong type
or a text value the field cannot take fails where the table is built; evaluation and wording
each live in one place. A ``Carry`` keeps a constructor keyword (``argument``) apart from words
about code that fixes the value (``hardcoded``).
"""

from __future__ import annotations

import pytest

from vitconv.config import ViTConfig
from vitconv.layouts import LAYOUTS
from vitconv.layouts.table import ALWAYS, FINAL_NORM, LAYERNORM, MAP, All, Carry, Rule, When, fill
from vitconv.layouts.transforms import IDENTITY

_CFG = ViTConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=96,
                 num_classes=10)


@pytest.mark.parametrize("condition,cfg,expected", [
    (When("qkv_bias"), _CFG, True),
    (When("qkv_bias"), _CFG.replace(qkv_bias=False), False),
    (~When("qkv_bias"), _CFG.replace(qkv_bias=False), True),
    (When("representation_size"), _CFG, False),  # None
    (When("representation_size"), _CFG.replace(representation_size=48), True),
    (When("num_reg_tokens"), _CFG.replace(num_reg_tokens=2), True),
    (~When("num_reg_tokens"), _CFG, True),  # 0
    (When("resnet_layers"), _CFG.replace(resnet_layers=()), False),  # a stem-only hybrid's empty tuple
    (MAP, _CFG.replace(classifier="map", class_token=False), True),
    (MAP, _CFG, False),
    (FINAL_NORM, _CFG.replace(final_norm="none"), False),
    (FINAL_NORM, _CFG, True),
    (When("pos_resize", "!=", "sincos2d"), _CFG.replace(pos_resize="sincos2d"), False),
    (LAYERNORM & When("qk_norm"), _CFG.replace(qk_norm=True), True),
    (LAYERNORM & When("qk_norm"), _CFG.replace(qk_norm=True, norm="rmsnorm"), False),
    (ALWAYS, _CFG, True),
])
def test_a_condition_holds_as_its_field_says(condition, cfg, expected):
    assert condition.holds(cfg) is expected


def test_conditions_join_flat_and_say_what_they_test():
    joined = When("qkv_unfused") & When("qkv_bias") & ~When("key_bias")
    assert joined == All((When("qkv_unfused"), When("qkv_bias"), When("key_bias", "falsy")))
    assert joined.describe() == "qkv_unfused & qkv_bias & not key_bias"
    assert (MAP & LAYERNORM).describe() == "classifier='map' & norm='layernorm'"
    assert FINAL_NORM.describe() == "final_norm!='none'"
    assert ALWAYS.describe() == "always" and ALWAYS.parts == ()
    assert ~~When("mask_token") == When("mask_token")
    assert [p.field for p in (When("rope", "==", "mixed") & When("norm_pre")).parts] == ["rope", "norm_pre"]


@pytest.mark.parametrize("args,says", [
    (("qkv_biass",), "'qkv_biass' is not a ViTConfig field"),
    (("classifier", "==", "attention"), "classifier is one of"),
    (("head_bias", "==", "False"), "head_bias holds bool values"),
    (("num_classes", "==", 0.0), "num_classes holds int values"),
    (("classifier", "==", None), "need a value"),
    (("qkv_bias", "truthy", True), "need a value"),
    (("qkv_bias", "is", True), "unknown test 'is'"),
])
def test_a_condition_is_checked_where_it_is_written(args, says):
    with pytest.raises(ValueError, match=says):
        When(*args)


def test_a_row_takes_no_string_condition():
    with pytest.raises(TypeError, match="When or All"):
        Rule("head.bias", ("head.bias",), IDENTITY, "model", "num_classes")
    with pytest.raises(TypeError, match="When or All"):
        fill("head.bias", lambda c: (c.num_classes,), "num_classes&head_bias=False")


def test_every_table_row_is_typed():
    """Every row of every layout, for configs that reach the conditional rows, carries a typed
    condition whose fields are real (the dataclass checks) and words that name them."""
    configs = [_CFG, _CFG.replace(classifier="map", class_token=False, num_classes=0, norm="rmsnorm", qk_norm=True),
               _CFG.replace(num_reg_tokens=2, layer_scale=True, mask_token=True, mlp="swiglu", act="silu")]
    for layout in LAYOUTS.values():
        for cfg in configs:
            for r in layout.table(cfg):
                assert isinstance(r.when, (When, All)), (layout.name, r)
                assert all(p.field in r.when.describe() for p in r.when.parts)


def test_carry_keeps_a_keyword_apart_from_code_that_fixes_the_value():
    with pytest.raises(ValueError, match="not a keyword"):
        Carry("act", argument="its Mlp hard-codes exact GELU")
    with pytest.raises(ValueError, match="not both"):
        Carry("act", argument="act_layer", hardcoded="exact GELU")
    told = Carry("act", argument="act_layer", default="gelu")
    fixed = Carry("act", hardcoded="exact GELU, hard-coded", default="gelu")
    assert told.set_by_code and fixed.set_by_code and not Carry("act").set_by_code
    # what the layouts declare: jeonsworld hard-codes the GELU, timm takes act_layer
    assert LAYOUTS["jeonsworld"].carry("act").argument is None
    assert "hard-codes exact GELU" in LAYOUTS["jeonsworld"].carry("act").hardcoded
    assert LAYOUTS["timm"].carry("act").argument == "act_layer" and LAYOUTS["timm"].carry("act").hardcoded is None


def test_hardcoded_values_are_said_not_passed():
    """A bare jeonsworld file of a model with tanh GELU: the note says what to patch; a bare timm
    file: the keyword to pass. Only the keyword is an argument a reader is told."""
    cfg = _CFG.replace(act="gelu_tanh")
    jeons, timm = LAYOUTS["jeonsworld"], LAYOUTS["timm"]
    assert any(n.startswith("act='gelu_tanh', but the jeonsworld code assumes 'gelu': its Mlp hard-codes")
               for n in jeons.argument_notes(cfg, recorded=False))
    assert "act" not in jeons.arguments(cfg, recorded=False)
    assert "act='gelu_tanh' is not recorded in a bare timm state dict: pass act_layer='gelu_tanh'" in \
        timm.argument_notes(cfg, recorded=False)
    assert timm.arguments(cfg, recorded=False)["act"] == "gelu_tanh"


def test_a_value_the_tensors_show_is_neither_noted_nor_told():
    """timm's pooling is an argument only where the tensors leave it open (a class token without
    fc_norm): a mean without a class token, or normalised by fc_norm, is shown by the keys, so
    a reader of the bare file is not told it (it would be refused as a field the file records);
    an avg-pooled model with a class token and no fc_norm is told, in timm's spelling."""
    timm = LAYOUTS["timm"]
    shown = [_CFG.replace(class_token=False, classifier="gap"),
             _CFG.replace(classifier="gap", final_norm="pooled")]
    for cfg in shown:
        assert "classifier" not in timm.arguments(cfg, recorded=False)
        assert not any(n.startswith("classifier=") for n in timm.argument_notes(cfg, recorded=False))
    open_ = _CFG.replace(classifier="gap", final_norm="encoder")
    assert timm.arguments(open_, recorded=False)["classifier"] == "gap"
    assert "classifier='gap' is not recorded in a bare timm state dict: pass global_pool='avg'" in \
        timm.argument_notes(open_, recorded=False)
