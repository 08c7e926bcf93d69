"""The streamed ONNX export (issue 33, :mod:`vitconv.runtime.export.onnx_meta`): a model traced on the
``meta`` device, its weights streamed from the checkpoint, the file proved block by block.

On small models it writes the whole-model export's file: the same nodes, attributes, inputs,
outputs and metadata, every initializer the same bytes (the values between nodes carry other
FX names: on ``meta`` the attention's reshape is traced as ``_unsafe_view``), and onnxruntime's
outputs are equal to the bit. Its proof runs each part in its own session reading the written
file, and a damaged weight fails the export naming the block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import CASES, golden_path
from vitconv.errors import BadInputError, VerificationError
from vitconv.runtime.export import ExportPlan, onnx_meta, onnx_stream, run_export
from vitconv.runtime.export import run as export_run

TINY = golden_path(CASES["tiny_token_p8_32"]["checkpoint"])


def _canonical(m: onnx.ModelProto):
    """The graph with every value named by its first appearance (graph inputs, then node inputs
    and outputs in order), initializers keyed so: what two exports share when only names differ."""
    ids = {}

    def name(v: str) -> str:
        return ids.setdefault(v, f"v{len(ids)}") if v else ""

    for i in m.graph.input:
        name(i.name)
    nodes = []
    for n in m.graph.node:
        nodes.append((n.op_type, n.domain, [name(v) for v in n.input], [name(v) for v in n.output],
                      [a.SerializeToString() for a in n.attribute]))
    inits = {name(t.name): (t.data_type, list(t.dims), onnx.numpy_helper.to_array(t).tobytes())
             for t in m.graph.initializer}
    outputs = [(o.name, name(o.name), o.type.SerializeToString()) for o in m.graph.output]
    return nodes, inits, outputs


def _inputs(size: int, batch: int = 3, seed: int = 0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def _run(path, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]


@pytest.mark.parametrize("name,dynamic", [("tiny_token_p8_32", True), ("timm_dinov2_reg4_p8_32", False),
                                          ("timm_siglip_map_p8_32", False)])
def test_streamed_file_is_the_whole_model_file(tmp_path, name, dynamic):
    """Same graph up to value names, same initializer bytes, outputs equal to the bit (dynamic
    resolution: also at sizes the exporter never saw)."""
    case = CASES[name]
    src = golden_path(case["checkpoint"])
    kw = dict(dynamic_size=dynamic, overrides=case.get("set"))
    streamed = run_export(src, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, **kw))[0]
    whole = run_export(src, ExportPlan(onnx=tmp_path / "w.onnx", streamed=False, **kw))[0]
    assert streamed.ok and "streamed" in streamed.kind and "streamed" not in whole.kind
    s, w = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "w.onnx"))
    assert _canonical(s) == _canonical(w)
    assert s.graph.input == w.graph.input and s.opset_import == w.opset_import
    assert s.metadata_props == w.metadata_props
    for size in ([32, 40, 56] if dynamic else [32]):
        x = _inputs(size)
        assert np.array_equal(_run(tmp_path / "s.onnx", x), _run(tmp_path / "w.onnx", x)), size
    # the streamed parity figures are the whole export's: the same file run on the same inputs
    assert [(p.batch, p.size) for p in streamed.parity] == [(p.batch, p.size) for p in whole.parity]


def test_streamed_fp16_file_is_the_whole_model_fp16_file(tmp_path):
    """The float16 conversion runs on the skeleton either way: the same file again."""
    streamed = run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, fp16=True))[0]
    run_export(TINY, ExportPlan(onnx=tmp_path / "w.onnx", streamed=False, fp16=True))
    assert streamed.ok and streamed.fp16
    s, w = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "w.onnx"))
    assert _canonical(s) == _canonical(w)
    x = _inputs(32)
    assert np.array_equal(_run(tmp_path / "s.onnx", x), _run(tmp_path / "w.onnx", x))


def test_no_weight_is_held_by_the_trace_and_each_weight_is_read_as_it_is_written(monkeypatch, tmp_path):
    """The traced graph holds no weight (placeholders only); the checkpoint is read one tensor
    at a time, each once per placeholder it feeds (with a dynamic resolution pos_embed feeds two
    folded constants, its class row and its grid, as in the whole-model export)."""
    reads = []
    evaluate = onnx_meta.Recipe.evaluate

    def spy(self, read):
        def counted(name):
            reads.append(name)
            return read(name)
        return evaluate(self, counted)

    monkeypatch.setattr(onnx_meta.Recipe, "evaluate", spy)
    from vitconv.conversion.pipeline import open_checkpoint

    with open_checkpoint(TINY) as ckpt:
        cfg, names = ckpt.config, [n for n, _ in ckpt.tensors()]
    model, recipes = onnx_meta.graph(cfg, 20, None, True)  # dynamic size: the table is resized in-graph
    assert all(v.const_value is None for v in model.graph.initializers.values() if v.name in recipes)
    folded = {k: r.sources for k, r in recipes.items() if r.nodes}
    assert sorted(s for v in folded.values() for s in v) == sorted(
        ["pos_embed", "pos_embed"] + [f"blocks.{i}.{w}.weight" for i in range(2)
                                      for w in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")])
    run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, dynamic_size=True))
    assert sorted(reads) == sorted(names + ["pos_embed"])


def test_each_block_part_reads_only_its_blocks_weights(monkeypatch, tmp_path):
    """Depth-chunked at one block: the first part holds the embedding and block 0, the next
    block 1 alone, the last the head; together every node and weight of the file."""
    seen = []
    cut = onnx_meta.cut

    def spy(light, bounds, k):
        parts = cut(light, bounds, k)
        for p in parts:
            seen.append((p.blocks, {t.name for t in p.proto.graph.initializer}))
        return parts

    monkeypatch.setattr(onnx_meta, "cut", spy)
    run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, blocks_per_part=1))
    assert [b for b, _ in seen] == [[0], [1], []]
    light = onnx.load(str(tmp_path / "s.onnx"), load_external_data=False)
    owners = {}
    for n in light.graph.node:
        for i in n.input:
            owners.setdefault(i, set()).add(n.name)
    for blocks, weights in seen:
        big = {w for w in weights if w.startswith("blocks.")}
        assert all(w.split(".")[1] in {str(b) for b in blocks} for w in big), (blocks, big)
    assert set().union(*(w for _, w in seen)) == {t.name for t in light.graph.initializer}


def _damage(monkeypatch, weight: str, external: bool):
    """After the file is written, one float of the placeholder made from checkpoint tensor
    ``weight`` is changed in place on disk (in the ``.data`` file when ``external``)."""
    if external:
        monkeypatch.setattr(onnx_stream, "INLINE_LIMIT", 0)
    write = onnx_stream.write

    def damaging(skel, path, data_path=None):
        target = next(k for k, v in skel.weights.items() if v.recipe.sources == [weight])
        light = write(skel, path, data_path)
        t = next(t for t in light.graph.initializer if t.name == target)
        info = {e.key: e.value for e in t.external_data}
        with open(Path(path).parent / info["location"], "r+b") as f:
            f.seek(int(info["offset"]) + 4 * 7)
            f.write(np.float32(3.0).tobytes())
        return light

    monkeypatch.setattr(onnx_stream, "write", damaging)


@pytest.mark.parametrize("external", [True, False], ids=["external-data", "inline"])
def test_a_damaged_weight_fails_the_export_naming_its_block(monkeypatch, tmp_path, external):
    _damage(monkeypatch, "blocks.1.mlp.fc1.weight", external)
    with pytest.raises(VerificationError, match=r"block 1 \(blocks\.1\) output disagrees"):
        run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, blocks_per_part=2))
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_damaged_float16_weight_fails_the_export_naming_its_block(monkeypatch, tmp_path):
    """In a float16 file one weight set to 3.0 (a float32 pair of halves) turns block 1's
    activation by more than float16 rounding does."""
    _damage(monkeypatch, "blocks.1.mlp.fc2.weight", True)
    with pytest.raises(VerificationError, match=r"block 1 \(blocks\.1\) output disagrees.*cosine"):
        run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, fp16=True))
    assert not list(tmp_path.iterdir())


def test_a_damaged_first_block_weight_names_block_0(monkeypatch, tmp_path):
    _damage(monkeypatch, "blocks.0.attn.qkv.weight", True)
    with pytest.raises(VerificationError, match=r"block 0 \(blocks\.0\)"):
        run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, blocks_per_part=2))


def test_external_data_file_when_large(monkeypatch, tmp_path):
    """Above the inline limit the weights go to ``NAME.onnx.data``, which the parts read."""
    monkeypatch.setattr(onnx_stream, "INLINE_LIMIT", 0)
    r = run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True))[0]
    assert r.ok and sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx", "s.onnx.data"]
    assert np.array_equal(_run(tmp_path / "s.onnx", _inputs(32)).shape, (3, 10))


def test_streamed_when_the_whole_model_would_not_fit(monkeypatch, tmp_path):
    """The guard's condition picks the streamed path for --onnx alone; other targets, which
    need the whole model, are still refused."""
    monkeypatch.setattr(export_run, "physical_memory", lambda: 100_000)
    r = run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx"))[0]
    assert r.ok and "streamed" in r.kind and "(1 a session)" in " ".join(r.notes)
    with pytest.raises(BadInputError, match="export holds the whole model in memory"):
        run_export(TINY, ExportPlan(onnx=tmp_path / "t.onnx", torchscript=tmp_path / "t.pt"))


def test_environment_forces_the_streamed_path(monkeypatch, tmp_path):
    monkeypatch.setenv("VITCONV_ONNX_STREAMED", "1")
    monkeypatch.setenv("VITCONV_ONNX_BLOCKS", "2")
    r = run_export(TINY, ExportPlan(onnx=tmp_path / "s.onnx"))[0]
    assert r.ok and "streamed" in r.kind and "(2 a session)" in " ".join(r.notes)
    with pytest.raises(BadInputError, match="writes --onnx alone"):
        run_export(TINY, ExportPlan(onnx=tmp_path / "t.onnx", safetensors=tmp_path / "t.safetensors"))


def test_hybrid_is_refused_by_the_streamed_path(tmp_path):
    with pytest.raises(BadInputError, match="hybrid stem"):
        run_export(golden_path(CASES["tiny_r50_32"]["checkpoint"]), ExportPlan(onnx=tmp_path / "s.onnx",
                                                                                streamed=True))


#: timm families whose blocks read what the embedding computes from the grid: DINOv3's rotary
#: angles, BEiT's relative-position bias index; and EVA-02's SwiGLU, whose fc1 halves the
#: optimizer folds into a Split with no name scope (seeded, saved as timm files)
FAMILIES = {"vit_small_patch16_dinov3": dict(embed_dim=128, num_heads=2),
            "beit_base_patch16_224": dict(embed_dim=64, num_heads=2, num_classes=10),
            "eva02_tiny_patch14_224": dict(embed_dim=128, num_heads=2, num_classes=10)}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_rotary_and_relative_bias_families_stream_to_the_same_file(tmp_path, arch):
    """The same file as the whole-model export, and timm's own output within 1e-5 (relative)."""
    import safetensors.torch

    from conftest import seeded
    from timm_import import import_timm

    timm = import_timm()
    model = seeded(timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, depth=2, **FAMILIES[arch]))
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    streamed = run_export(src, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, image_size=32,
                                          blocks_per_part=1))[0]
    run_export(src, ExportPlan(onnx=tmp_path / "w.onnx", streamed=False, image_size=32))
    assert streamed.ok
    s, w = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "w.onnx"))
    assert _canonical(s) == _canonical(w)
    x = _inputs(32)
    got = _run(tmp_path / "s.onnx", x)
    assert np.array_equal(got, _run(tmp_path / "w.onnx", x))
    import torch

    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()  # the library's own forward
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_relative_bias_family_streams_with_dynamic_size(tmp_path):
    """timm BEiT with --dynamic-size: the graph resizes its relative tables to the input's grid
    (timm's geometric resize, unrolled in torch ops). Streamed, it is the whole-model export's
    file, and runs as it at a size neither saw (the resize's bisection bounds were literals,
    lifted out of the traced graph as constants the checkpoint does not hold, and refused)."""
    import safetensors.torch

    from conftest import seeded
    from timm_import import import_timm

    timm = import_timm()
    arch = "beit_base_patch16_224"
    model = seeded(timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, depth=2, **FAMILIES[arch]))
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    streamed = run_export(src, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True, dynamic_size=True,
                                          blocks_per_part=1))[0]
    run_export(src, ExportPlan(onnx=tmp_path / "w.onnx", streamed=False, dynamic_size=True))
    assert streamed.ok
    s, w = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "w.onnx"))
    assert _canonical(s) == _canonical(w)
    x = _inputs(48)
    assert np.array_equal(_run(tmp_path / "s.onnx", x), _run(tmp_path / "w.onnx", x))


def test_cli_streamed_and_whole_flags(monkeypatch, tmp_path):
    """``--streamed`` asks for the streamed path, ``--whole`` for the whole-model one even where
    the environment forces streaming."""
    from click.testing import CliRunner

    from _vitconv_cli.main import main

    r = CliRunner().invoke(main, ["export", str(TINY), "--onnx", str(tmp_path / "s.onnx"), "--streamed"])
    assert r.exit_code == 0 and "onnx (streamed)" in r.output and "proved block by block" in r.output
    monkeypatch.setenv("VITCONV_ONNX_STREAMED", "1")
    r = CliRunner().invoke(main, ["export", str(TINY), "--onnx", str(tmp_path / "w.onnx"), "--whole"])
    assert r.exit_code == 0 and "onnx (streamed)" not in r.output and "proved block by block" not in r.output


def test_equal_weights_are_merged_only_by_the_whole_model_export(tmp_path):
    """onnx_ir's initializer deduplication merges two weights of equal bytes in the whole-model
    export (measured: two equal MLP biases; two equal kernels are not merged, their transposes
    being folded after it runs); placeholders have no bytes to compare, so the streamed file
    keeps both. The graphs differ by that one initializer; the outputs are equal to the bit."""
    arrays = dict(np.load(TINY))
    k0 = next(k for k in arrays if "encoderblock_0/MlpBlock" in k and k.endswith("Dense_0/bias"))
    arrays[k0.replace("encoderblock_0", "encoderblock_1")] = arrays[k0].copy()
    src = tmp_path / "dup.npz"
    np.savez(src, **arrays)
    run_export(src, ExportPlan(onnx=tmp_path / "s.onnx", streamed=True))
    run_export(src, ExportPlan(onnx=tmp_path / "w.onnx", streamed=False))
    s, w = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "w.onnx"))
    assert len(s.graph.initializer) == len(w.graph.initializer) + 1
    x = _inputs(32)
    assert np.array_equal(_run(tmp_path / "s.onnx", x), _run(tmp_path / "w.onnx", x))
