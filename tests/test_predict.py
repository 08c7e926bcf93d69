"""``vitconv predict``, the preprocessing it applies, and the outputs that carry preprocessing and
labels: Hugging Face directories run in ``transformers.pipeline`` offline and agree with
``vitconv predict`` on the source and on the ONNX export; labels survive HF -> timm -> ONNX ->
TorchScript -> vitconv files.

References: transformers' own image processors (built from the ``preprocessor_config.json``
vitconv writes) for the pixels, and its ``pipeline`` for the end-to-end prediction.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vitconv
from _vitconv_cli.main import main
from conftest import CASES, golden_path
from vitconv.runtime import preprocess
from vitconv.errors import MappingError
from vitconv.runtime.export import ExportPlan, run_export
from vitconv.runtime.predict import open_predictor, predict

IMAGE = golden_path("images/shapes_64x48.png")
LABELS = ["house", "sun", "field", "sky", "roof", "door", "tree", "cloud", "road", "bird"]


def _image():
    from PIL import Image

    return Image.open(IMAGE)


@pytest.mark.parametrize("pre", [preprocess.GOOGLE, preprocess.SIGLIP, preprocess.DINOV2, preprocess.CLIP,
                                 preprocess.TIMM_DEFAULT], ids=lambda p: p.source.split(":")[0][:24])
@pytest.mark.parametrize("size", [32, 48])
def test_pixels_equal_transformers_image_processor(pre, size):
    """The preprocessor_config.json vitconv writes, run by transformers' own processor, gives
    the pixels ``Preprocessing.apply`` gives (squash and shortest-side-then-crop alike)."""
    from transformers import BitImageProcessor, ViTImageProcessor

    d = pre.hf_processor(size)
    cls = {"ViTImageProcessor": ViTImageProcessor, "BitImageProcessor": BitImageProcessor}[d.pop("image_processor_type")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = cls(**d)(_image(), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = pre.apply(_image(), size)
    assert got.shape == want.shape == (size, size, 3)
    assert float(np.abs(got - want).max()) < 1e-5


def _classifier_cases():
    seen, out = set(), []
    for c in CASES.values():
        if c["checkpoint"] not in seen and c["image_size"] is None:
            seen.add(c["checkpoint"])
            out.append(c["name"])
    return out


#: Golden classifiers no Hugging Face class computes, with what the refusal names (the hf
#: layouts' own reasons). A case that starts converting fails the test below, to be moved to
#: the pipeline test.
NO_HF = {
    "tiny_gap_p8_32": "hf_siglip: classifier='gap'",
    "bv_tiny_gap_scan_p8_32": "hf_siglip: classifier='gap'",
    "bv_tiny_rep_gap_p8_32": "hf_model: classifier='gap'",
    "tiny_prelogits_p8_32": "hf: representation_size=48",
    "tiny_r50_32": "hf: resnet_layers=(1, 1)",
    "timm_dinov2_reg4_p8_32": "hf_dinov2_reg: pos_embed_prefix='none'",
    "timm_siglip_map_p8_32": "no hf_siglip row for head.weight, head.bias",
    "bv_tiny_map_head_p8_32": "no hf_siglip row for head.weight, head.bias",
    "bv_tiny_tok_p8_32": "hf: pos_embed_prefix='none'",
    "bv_tiny_tok_p4_48": "hf: pos_embed_prefix='none'",
    "bv_tiny_flexi_p8_32": "hf: pos_embed_prefix='none'",
    "timm_dinov3_p8_32": "hf_dinov3: classifier='gap'",  # timm's DINOv3 pools the mean; HF's the class token
    "timm_dinov3_qkvb_p8_32": "hf_dinov3: classifier='gap'",
    "timm_eva02_p8_32": "rope='cat'",  # transformers has no EVA-02 vision model
}


@pytest.mark.parametrize("name", sorted(NO_HF))
def test_classifiers_no_hf_class_computes_are_refused_with_the_reason(name, tmp_path):
    assert name in _classifier_cases()
    with pytest.raises(MappingError, match="the hf layout cannot express this model") as e:
        vitconv.convert(golden_path(CASES[name]["checkpoint"]), tmp_path / "hf", to="hf", hash_source=False,
                        overrides=CASES[name].get("set"))
    assert NO_HF[name] in e.value.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [n for n in _classifier_cases() if n not in NO_HF])
def test_hf_pipeline_agrees_with_predict(name, tmp_path):
    """Every golden checkpoint that a Hugging Face layout can express: converted to a directory,
    ``pipeline(...)`` runs offline on the shipped image; for classifiers its top-1 (and its
    probabilities) equal ``vitconv predict`` on the source checkpoint and on the ONNX export,
    whose labels are the ones given to the conversion."""
    from transformers import pipeline

    src, told = golden_path(CASES[name]["checkpoint"]), CASES[name].get("set") or {}  # what a bare file leaves open
    cfg = vitconv.load(src, **told).config
    labels = LABELS[: cfg.num_classes] if cfg.num_classes == 10 else None
    hf = tmp_path / "hf"
    vitconv.convert(src, hf, to="hf", labels=labels, hash_source=False, overrides=told)
    onnx = tmp_path / "m.onnx"
    run_export(src, ExportPlan(onnx=onnx, labels=labels, overrides=told))
    ours = predict(open_predictor(src, labels=labels, overrides=told), [IMAGE], top_k=3)[0]
    exported = predict(onnx, [IMAGE], top_k=3)[0]  # its labels come from the ONNX metadata
    arch = json.loads((hf / "config.json").read_text())["architectures"][0]
    if not arch.endswith("ForImageClassification"):
        assert ours.embedding_norm == pytest.approx(exported.embedding_norm, rel=1e-4)
        feats = pipeline("image-feature-extraction", model=str(hf))(str(IMAGE))
        assert np.asarray(feats).ndim == 3  # it runs offline: tokens x width
        return
    got = pipeline("image-classification", model=str(hf))(str(IMAGE), top_k=3)
    assert [g["label"] for g in got] == [label for _, label, _ in ours.top] == \
        [label for _, label, _ in exported.top]
    assert [g["score"] for g in got] == pytest.approx([p for _, _, p in ours.top], abs=1e-5)
    assert [p for _, _, p in exported.top] == pytest.approx([p for _, _, p in ours.top], abs=1e-5)


def test_labels_round_trip_through_every_output(tmp_path):
    """Labels given once survive Hugging Face -> timm -> vitconv .pt -> ONNX and TorchScript,
    each output read back by vitconv (predict) and by its own library's spelling."""
    src = golden_path("jax/tiny_token_p8_32.npz")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    vitconv.convert(src, tmp_path / "hf", labels=str(labels_file), hash_source=False)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert [hf["id2label"][str(i)] for i in range(10)] == LABELS and hf["label2id"]["sun"] == 1
    vitconv.convert(tmp_path / "hf", tmp_path / "timm", to="timm", hash_source=False)
    timm = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert timm["label_names"] == LABELS
    assert (timm["mean"], timm["crop_mode"], timm["interpolation"]) == ([0.5] * 3, "squash", "bilinear")
    vitconv.convert(tmp_path / "timm", tmp_path / "m.pt", hash_source=False)
    run_export(tmp_path / "m.pt", ExportPlan(onnx=tmp_path / "m.onnx", torchscript=tmp_path / "m.ts"))
    for p in ("hf", "timm", "m.pt", "m.onnx", "m.ts"):
        assert open_predictor(tmp_path / p).usage.labels == tuple(LABELS), p
    import onnx

    meta = {m.key: m.value for m in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["vitconv_labels"]) == LABELS and json.loads(meta["preprocessing"])["std"] == [0.5] * 3


def test_shipped_label_lists_and_their_suggestion(tmp_path):
    from vitconv.runtime.labels import load_labels, suggest

    in1k, in21k = load_labels("imagenet-1k"), load_labels("imagenet-21k")
    assert (len(in1k), len(in21k)) == (1000, 21843)
    assert in1k[0] == "tench, Tinca tinca" and in1k[281] == "tabby, tabby cat"  # HF's google/vit-* names
    assert suggest(1000) == "imagenet-1k" and suggest(21843) == "imagenet-21k" and suggest(10) is None
    r = CliRunner().invoke(main, ["convert", str(golden_path("jax/tiny_token_p8_32.npz")), str(tmp_path / "x.pt"),
                                  "--labels", "imagenet-1k"])
    assert r.exit_code == 2 and "--labels gives 1,000 labels, but the model has 10 classes" in r.stderr


def test_predict_cli_text_and_json():
    src = golden_path("jax/tiny_token_p8_32.npz")
    r = CliRunner().invoke(main, ["predict", str(src), str(IMAGE), "--top-k", "2"])
    assert r.exit_code == 0, r.output
    assert "vit_jax's input pipeline" in r.stdout and "class " in r.stdout
    r = CliRunner().invoke(main, ["predict", str(src), str(IMAGE), str(IMAGE), "--json"])
    d = json.loads(r.stdout)
    assert len(d["predictions"]) == 2 and len(d["predictions"][0]["top"]) == 5
    assert sum(t["probability"] for t in d["predictions"][0]["top"]) <= 1 + 1e-9


def test_predict_refuses_bad_images_in_one_line(tmp_path):
    from PIL import Image

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"hello, not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(IMAGE.read_bytes()[:200])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx of one bit: a few KB on disk
    src = str(golden_path("jax/tiny_token_p8_32.npz"))
    for bad, words in ((junk, "not an image in a format predict reads"), (truncated, "unreadable"),
                       (bomb, "image too large to decode"), (tmp_path / "none.png", "no such file")):
        r = CliRunner().invoke(main, ["predict", src, str(bad)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and bad.name in lines[0] and words in lines[0], r.stderr
