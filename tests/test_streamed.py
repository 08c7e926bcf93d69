"""The block-by-block runner (:class:`vitconv.conversion.loading.StreamedModel`), which verify and
``convert --verify`` use for every model they read from a file, against the whole model built
in memory: every stage equal to the bit, on every golden case (hybrid stem, MAP head,
registers, big_vision's scan-stacked and bfloat16 files, a resize), and one block's weights
materialised at a time."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, golden_input, golden_path
from vitconv import model as model_module
from vitconv.conversion.loading import StreamedModel, load
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions


def _case_args(case: dict) -> dict:
    native = case.get("image_size")
    return {"image_size": native} if native and "_to_" in case["name"] else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_by_block_equals_the_whole_model_bit_for_bit(name):
    case = CASES[name]
    path, args, told = golden_path(case["checkpoint"]), _case_args(case), case.get("set", {})
    x = golden_input(case)
    with torch.no_grad():
        whole = load(path, **args, **told).forward_stages(x)
    streamed = StreamedModel(lambda: open_checkpoint(path, ReadOptions(**args, overrides=told))).forward_stages(x)
    assert list(streamed) == list(whole)
    for k in whole:
        assert torch.equal(streamed[k], whole[k]), k


def test_one_block_in_memory_at_a_time(monkeypatch):
    """When block i runs, it alone of the blocks holds real weights: the ones before it were
    released, the ones after it are not read yet; after the pass none is held."""
    blocks, seen = [], []
    init, run = model_module.Block.__init__, model_module.Block.forward_stages

    def spy_init(self, cfg):
        init(self, cfg)
        blocks.append(self)

    def spy_run(self, x, pos):
        seen.append([b.norm1.weight.device.type != "meta" for b in blocks])
        return run(self, x, pos)

    monkeypatch.setattr(model_module.Block, "__init__", spy_init)
    monkeypatch.setattr(model_module.Block, "forward_stages", spy_run)
    case = CASES["tiny_r50_32"]
    path = golden_path(case["checkpoint"])
    StreamedModel(lambda: open_checkpoint(path)).forward_stages(golden_input(case))
    depth = len(blocks)
    assert depth >= 2
    assert seen == [[j == i for j in range(depth)] for i in range(depth)]
    assert all(b.norm1.weight.device.type == "meta" for b in blocks)
