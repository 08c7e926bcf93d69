"""ONNX exports, run in onnxruntime, reproduce Google's golden logits (fp32 <= 1e-4), at
batch sizes and resolutions the exporter never saw; fp16 keeps top-1 and cosine >= 0.9999."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import vitconv
from conftest import CASES, golden_expected, golden_input, golden_path
from vitconv.config import ViTConfig
from vitconv.runtime.export import ExportPlan, run_export
from vitconv.runtime.export.onnx import to_fp16

ATOL = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor) -> np.ndarray:
    return sess.run(["logits"], {"pixel_values": x.numpy()})[0]


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    """tiny_token_p8_32 exported once with dynamic batch and resolution (example: 2 x 32 px)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    results = run_export(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]),
                         ExportPlan(onnx=out, dynamic_size=True))
    assert results[0].ok
    return out


def test_single_self_contained_file_passing_full_check(dynamic_onnx):
    assert sorted(p.name for p in dynamic_onnx.parent.iterdir()) == ["tiny.onnx"]  # no .data
    onnx.checker.check_model(str(dynamic_onnx), full_check=True)
    m = onnx.load(str(dynamic_onnx))
    assert [i.name for i in m.graph.input] == ["pixel_values"]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", 3, "8*height", "8*width"]
    assert {o.domain or "ai.onnx": o.version for o in m.opset_import}["ai.onnx"] == 20
    assert "Resize" in {n.op_type for n in m.graph.node}  # the position table is resized in-graph


def test_metadata_props(dynamic_onnx):
    case = CASES["tiny_token_p8_32"]
    meta = {p.key: p.value for p in onnx.load(str(dynamic_onnx)).metadata_props}
    cfg = ViTConfig.from_json(meta["vitconv_config"])
    assert (cfg.patch_size, cfg.width, cfg.depth, cfg.num_classes) == (8, 48, 2, 10)
    assert meta["image_size"] == "32"
    pre = json.loads(meta["preprocessing"])
    assert pre["mean"] == pre["std"] == [0.5, 0.5, 0.5]
    src = golden_path(case["checkpoint"])
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source_sha256"] == case["sha256"][case["checkpoint"]]


@pytest.mark.parametrize("rows", [slice(None), slice(0, 1), slice(0, 3)], ids=["b4", "b1", "b3"])
def test_golden_logits_at_unseen_batch_sizes(dynamic_onnx, rows):
    case = CASES["tiny_token_p8_32"]
    got = run(session(dynamic_onnx), golden_input(case)[rows])
    err = float(np.abs(got - golden_expected(case, "logits")[rows]).max())
    assert err <= ATOL, err


def test_golden_logits_at_48px_never_exported(dynamic_onnx):
    """The 32 px export run on 48 px inputs equals Google's fine-tune-resize golden case."""
    case = CASES["tiny_token_p8_32_to_48"]
    got = run(session(dynamic_onnx), golden_input(case))
    err = float(np.abs(got - golden_expected(case, "logits")).max())
    assert err <= ATOL, err


@pytest.mark.parametrize("size", [40, 56])
def test_unseen_resolution_equals_model_converted_at_that_size(dynamic_onnx, size):
    ckpt = golden_path(CASES["tiny_token_p8_32"]["checkpoint"])
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    with torch.no_grad():
        want = vitconv.load(ckpt, image_size=size)(x).numpy()  # scipy zoom, as npz2pt --image-size
    err = float(np.abs(run(session(dynamic_onnx), x) - want).max())
    assert err <= ATOL, err


def test_fp16_keeps_top1_and_cosine(dynamic_onnx, tmp_path):
    half = to_fp16(onnx.load(str(dynamic_onnx)))
    path = tmp_path / "half.onnx"
    onnx.save_model(half, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = {i.name: i.data_type for i in m.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in inits.values()
    for node in m.graph.node:  # LayerNorm scale/bias stay float32
        if node.op_type == "LayerNormalization":
            assert all(inits.get(n, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in node.input[1:])
    for case in (CASES["tiny_token_p8_32"], CASES["tiny_token_p8_32_to_48"]):
        x = golden_input(case)
        ref, got = golden_expected(case, "logits"), run(session(path), x)
        assert got.argmax(-1).tolist() == ref.argmax(-1).tolist() == case["top1"]
        cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
        assert cos.min() >= 0.9999, cos


def test_hybrid_r50_exports_and_matches_golden(tmp_path):
    """Static resolution here: with dynamic height/width torch.export spends ~35 s reasoning
    symbolically about the stem's SAME padding (the export works and verifies: see
    ``vitconv export golden/jax/tiny_r50_32.npz --onnx --dynamic-size``)."""
    case = CASES["tiny_r50_32"]
    out = tmp_path / "r50.onnx"
    run_export(golden_path(case["checkpoint"]), ExportPlan(onnx=out))
    onnx.checker.check_model(str(out), full_check=True)
    m = onnx.load(str(out))
    assert not any(i.data_type == onnx.TensorProto.DOUBLE for i in m.graph.initializer)
    assert not any(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE
                                               for a in n.attribute) for n in m.graph.node)
    sess = session(out)
    for rows in (slice(None), slice(0, 1)):
        err = float(np.abs(run(sess, golden_input(case)[rows]) - golden_expected(case, "logits")[rows]).max())
        assert err <= ATOL, err


def test_a_handed_over_model_is_freed_once_its_weights_are_written(tmp_path):
    """run_export hands ONNX the model (a one-element list): its weights are emptied in place
    after the file is written, before onnxruntime loads it; a model passed as itself is left alone."""
    from vitconv.conversion.loading import load
    from vitconv.runtime.export import check_plan, make_reference
    from vitconv.runtime.export.onnx import export_onnx

    src = golden_path("jax/tiny_token_p8_32.npz")
    model = load(src)
    checks = check_plan(32, 8, None, False)
    reference = make_reference(src, model, 32, checks)
    kept = export_onnx(model, tmp_path / "a.onnx", reference, checks)
    assert kept.ok and all(p.numel() for p in model.parameters())
    owned = [model]
    handed = export_onnx(owned, tmp_path / "b.onnx", reference, checks)
    assert handed.ok and owned == [] and all(p.numel() == 0 for p in model.parameters())
    assert [p.max_abs for p in handed.parity] == [p.max_abs for p in kept.parity]


def _exported(src="jax/tiny_token_p8_32.npz"):
    """The exporter's onnx_ir model of a golden checkpoint, and that model as one protobuf
    (what ``onnx_ir.save`` would write)."""
    import onnx_ir

    from vitconv.conversion.loading import load
    from vitconv.runtime.export.common import export_ready
    from vitconv.runtime.export.onnx import example_input

    model = load(golden_path(src))
    program = torch.onnx.export(export_ready(model), (example_input(model.config, None),), dynamo=True)
    whole = onnx_ir.to_proto(program.model)
    del whole.graph.value_info[:]
    return program.model, whole


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_the_streamed_file_is_the_protobuf_the_whole_model_gives(tmp_path, fp16, external):
    """onnx_stream writes the weights one at a time, from a skeleton the float16 converter
    edited without them. What onnx reads back, external data loaded, must be exactly the
    message of the whole model: onnx_ir's own serialisation (fp32), or onnxruntime's
    converter run on the whole model, weights and all (fp16); and the checker, given the
    returned light model beside an inline file, must accept it."""
    from vitconv.runtime.export import onnx_stream

    model, whole = _exported()
    skel = onnx_stream.skeleton(model)
    assert all(v.const_value is None for v in model.graph.initializers.values())
    weights = sum(w.nbytes for w in skel.weights.values())
    assert len(skel.weights) > 8 and len(whole.graph.initializer) > len(skel.weights) + 16  # + small ones
    assert weights > 0.7 * whole.ByteSize()  # most of the file; none of it in the skeleton:
    assert skel.proto.ByteSize() < whole.ByteSize() - weights + 32 * len(skel.weights)  # + placeholders
    if fp16:
        from onnxruntime.transformers import float16

        converters_own = float16.make_value_info_from_tensor
        whole, skel.proto = to_fp16(whole), to_fp16(skel.proto)
        assert float16.make_value_info_from_tensor is converters_own  # put back after each run
    path = tmp_path / "m.onnx"
    light = onnx_stream.write(skel, path, tmp_path / "m.onnx.data" if external else None)
    assert skel.weights == {}  # each handed on as it was written
    got = onnx.load(path)  # loads external data too, and marks where it was: "default"
    for t in got.graph.initializer:
        t.ClearField("data_location")
    assert list(got.graph.initializer) == list(whole.graph.initializer)
    assert got == whole  # nodes, value_info (fp16: the converter's shape inference) and all
    checked = path if external else tmp_path / "light.onnx"
    if not external:
        onnx.save_model(light, checked)
        assert checked.stat().st_size < path.stat().st_size - weights / (4 if fp16 else 2)
    onnx.checker.check_model(checked, full_check=True)
    # the light model's offsets are the data's true place: onnx reads the weights through it
    back = onnx.load(checked)
    assert [onnx.numpy_helper.to_array(t, base_dir=str(tmp_path)).tobytes() for t in back.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in whole.graph.initializer]


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_external_data_export_verifies_like_the_inline_one(tmp_path, monkeypatch, fp16):
    """Above protobuf's 2 GB limit the weights go to OUT.onnx.data; with the limit lowered, a
    golden model takes that path and gives the same parity figures as the inline file."""
    from vitconv.runtime.export import onnx_stream

    src = golden_path(CASES["tiny_token_p8_32"]["checkpoint"])
    inline = run_export(src, ExportPlan(onnx=tmp_path / "a.onnx", fp16=fp16))[0]
    monkeypatch.setattr(onnx_stream, "INLINE_LIMIT", 1000)
    ext = run_export(src, ExportPlan(onnx=tmp_path / "b.onnx", fp16=fp16))[0]
    assert [p.name for p in ext.paths] == ["b.onnx", "b.onnx.data"] and len(inline.paths) == 1
    one, head, data = (os.path.getsize(tmp_path / n) for n in ("a.onnx", "b.onnx", "b.onnx.data"))
    assert data > 0.4 * one and head + data < one + 4096  # the weights moved, and only they
    assert ext.ok and [p.max_abs for p in ext.parity] == [p.max_abs for p in inline.parity]
    x = golden_input(CASES["tiny_token_p8_32"])
    assert np.array_equal(run(session(tmp_path / "a.onnx"), x), run(session(tmp_path / "b.onnx"), x))


def test_plain_verify_judges_a_float16_graph_as_export_does(tmp_path):
    """``vitconv verify SRC X.onnx`` on a ``--fp16`` export: the graph's metadata says float16,
    so its output is judged by export's rule (every top-1 equal, cosine >= 0.9999), with the
    max abs the float32 tolerance would have failed on still shown; a float16 graph of another
    model fails it."""
    from vitconv.verification.verify import verify

    src = golden_path(CASES["tiny_token_p8_32"]["checkpoint"])
    run_export(src, ExportPlan(onnx=tmp_path / "h.onnx", fp16=True))
    run_export(golden_path("jax/tiny_gap_p8_32.npz"), ExportPlan(onnx=tmp_path / "other.onnx", fp16=True))
    report = verify(src, tmp_path / "h.onnx")
    (stage,) = report.stages
    assert report.ok and stage.max_abs > 1e-3 and "top-1 100% equal" in stage.rule, report.lines()
    assert "cosine >= 0.9999" in report.note and "float16 graph" in report.verdict()
    other = verify(src, tmp_path / "other.onnx")
    assert not other.ok and "needs 100% and >= 0.9999" in other.first_failure.note
    run_export(src, ExportPlan(onnx=tmp_path / "f.onnx"))  # float32: the float32 bound, as before
    plain = verify(src, tmp_path / "f.onnx").stages[0]
    assert plain.ok and plain.rule == "" and plain.max_abs <= 1e-4


def test_float16_rounding_is_the_converter_s_bit_for_bit():
    """onnx_stream.to_float16 stands in for onnxruntime's convert_np_to_float16 (the
    converter's defaults) on the weights it streams: the same bits on values at and around
    every threshold, both signs, zeros, infinities, NaN and ordinary weights."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from vitconv.runtime.export.onnx_stream import to_float16

    edges = np.array([0.0, 5.96e-08, 65504.0, 65519.0, 65520.0, 1e5, 3e38, 1e-8, 5.9e-8, 6e-8, 1e-7,
                      6.1e-5, 1.0, np.inf, np.nan], np.float32)
    edges = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(np.inf)),
                            np.nextafter(edges, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(200_001) * np.float32(0.02)).astype(np.float32)
    weights[::997] *= np.float32(1e-6)  # some below float16's subnormals
    for a in (edges, weights, weights.reshape(-1)[:200_000].reshape(400, 500), np.zeros(3, np.float32)):
        want = convert_np_to_float16(a)
        got = to_float16(a)
        assert got.dtype == np.float16 and got.shape == a.shape
        assert got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_the_parity_run_reads_the_written_file_s_own_bytes(tmp_path, monkeypatch, fp16):
    """onnxruntime runs the inline file through its light description (each weight external
    data at its offset in the file itself): a weight altered in the file after it is written
    must fail the parity run, and nothing appears."""
    from vitconv.errors import VerificationError
    from vitconv.runtime.export import onnx_stream

    write = onnx_stream.write

    def write_then_damage(skel, path, data_path=None):
        light = write(skel, path, data_path)
        head = next(t for t in light.graph.initializer if t.name.startswith("head.") and t.dims[0] > 1)
        where = {e.key: e.value for e in head.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(head.data_type)
        with open(path, "r+b") as f:
            f.seek(int(where["offset"]))
            weights = np.frombuffer(f.read(int(where["length"])), dtype)
            f.seek(int(where["offset"]))
            f.write((weights * dtype.type(1.5)).tobytes())  # the head's weights half as large again
        return light
    monkeypatch.setattr(onnx_stream, "write", write_then_damage)
    src = golden_path(CASES["tiny_token_p8_32"]["checkpoint"])
    with pytest.raises(VerificationError):
        run_export(src, ExportPlan(onnx=tmp_path / "m.onnx", fp16=fp16))
    assert list(tmp_path.iterdir()) == []
