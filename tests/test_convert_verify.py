"""``convert(..., verify=True)`` / ``vitconv convert --verify``: the written files, read back as
a user reads them, are checked against the source's independent reference (Google's NumPy
forward pass) before they are renamed into place; nothing appears when they disagree. And the
provenance every output with metadata records (source sha256 by hashlib, vitconv's version)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

import vitconv
from conftest import golden_path
from vitconv.errors import VerificationError
from vitconv.formats.safetensors_stream import SafetensorsStreamWriter

SRC = golden_path("jax/tiny_token_p8_32.npz")
GAP = golden_path("jax/tiny_gap_p8_32.npz")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path) -> dict:
    with safe_open(str(path), "np") as f:
        return f.metadata() or {}


@pytest.mark.parametrize("dst,to,dtype", [
    ("a.safetensors", None, None), ("a.pt", None, None), ("a.npz", None, None),
    ("t.pth", "timm", None), ("t.safetensors", "timm", "bfloat16"), ("hf", None, None), ("tdir", "timm", None),
    ("h.safetensors", None, "float16"), ("b.npz", None, "bfloat16"),
])
def test_verified_before_commit_on_every_container(dst, to, dtype, tmp_path):
    report = vitconv.convert(SRC, tmp_path / dst, to=to, dtype=dtype, verify=True)
    assert report.checked is not None and report.checked.ok, report.checked
    assert "NumPy float64 reference of vit_jax" in report.checked.reference
    assert len(report.checked.stages) == 9  # every stage of the NumPy reference
    if dtype:  # the rounded file proven bit for bit, the float32 model at the usual tolerance
        assert f"written as {dtype}" in report.checked.note and report.checked.tolerance == 1e-4
    assert (tmp_path / dst).exists()


@pytest.mark.parametrize("dst,to,weights", [
    ("a.safetensors", None, "a.safetensors"), ("t.safetensors", "timm", "t.safetensors"),
    ("hf", None, "hf/model.safetensors"), ("tdir", "timm", "tdir/model.safetensors"),
])
def test_provenance_in_every_safetensors_header(dst, to, weights, tmp_path):
    vitconv.convert(SRC, tmp_path / dst, to=to, verify=True)
    meta = _header(tmp_path / weights)
    assert meta["source_sha256"] == _sha(SRC) and meta["source"] == SRC.name
    assert meta["vitconv_version"] == vitconv.__version__ and meta["vitconv_verified"] == "true"
    vitconv.convert(SRC, tmp_path / ("un" + dst), to=to)  # not verified: not said
    assert "vitconv_verified" not in _header(tmp_path / ("un" + weights))


def test_provenance_in_a_shard_index_and_a_vitconv_pt(tmp_path):
    vitconv.convert(SRC, tmp_path / "s.safetensors", shard_bytes=40_000, verify=True)
    index = json.loads((tmp_path / "s.safetensors.index.json").read_text())
    assert index["metadata"]["source_sha256"] == _sha(SRC) and index["metadata"]["vitconv_verified"] == "true"
    vitconv.convert(SRC, tmp_path / "c.pt", verify=True)
    with vitconv.open_checkpoint(tmp_path / "c.pt") as c:
        assert c.source.metadata["source_sha256"] == _sha(SRC)
        assert c.source.metadata["vitconv_verified"] == "true"


def test_a_file_its_layout_computes_differently_is_not_written(tmp_path):
    # jeonsworld's code uses erf GELU; Google's tiny model uses the tanh form: the file holds the
    # right tensors, but read back as a jeonsworld user reads it, it computes something else.
    out = tmp_path / "j.pth"
    with pytest.raises(VerificationError, match=r"j\.pth: FAILED: first stage past tolerance is block 0 MLP"):
        vitconv.convert(SRC, out, to="jeonsworld", verify=True)
    assert list(tmp_path.iterdir()) == []
    vitconv.convert(SRC, out, to="jeonsworld")  # without --verify it is written, with a note
    assert out.exists()


def test_a_corrupted_write_is_caught_and_nothing_appears(tmp_path, monkeypatch):
    write = SafetensorsStreamWriter._write

    def corrupt(self, index, a):  # one weight 1% off on its way to the disk
        if self.specs[index].name.endswith(("blocks.1.mlp.fc2.weight", "layer.1.output.dense.weight")):
            a = a * np.float32(1.01)
        write(self, index, a)
    monkeypatch.setattr(SafetensorsStreamWriter, "_write", corrupt)
    with pytest.raises(VerificationError, match="block 1 MLP"):
        vitconv.convert(SRC, tmp_path / "x.safetensors", verify=True)
    with pytest.raises(VerificationError, match="block 1 MLP"):
        vitconv.convert(SRC, tmp_path / "hf", verify=True)
    assert list(tmp_path.iterdir()) == []


def test_a_badly_rounded_tensor_is_named(tmp_path, monkeypatch):
    write = SafetensorsStreamWriter._write

    def truncate(self, index, a):  # one float16 ulp toward zero: not round-to-nearest
        if self.specs[index].name == "head.weight":
            a = np.nextafter(a, np.float16(0))
        write(self, index, a)
    monkeypatch.setattr(SafetensorsStreamWriter, "_write", truncate)
    with pytest.raises(VerificationError, match="head.weight: the written tensor is not the float32 weight "
                                                "rounded to float16"):
        vitconv.convert(SRC, tmp_path / "x.safetensors", dtype="float16", verify=True)
    assert list(tmp_path.iterdir()) == []


def run_cli(*args):
    from _vitconv_cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_verify_flag(tmp_path):
    ok = run_cli("convert", SRC, tmp_path / "x.safetensors", "--dtype", "bfloat16", "--verify")
    assert ok.exit_code == 0 and "verified  OK: 9 stage(s)" in ok.stdout, ok.output
    assert "written as bfloat16 are the verified float32 weights rounded" in ok.stdout
    bad = run_cli("convert", SRC, tmp_path / "j.pth", "--to", "jeonsworld", "--verify")
    assert bad.exit_code == 3 and bad.stderr.count("\n") == 1 and "FAILED" in bad.stderr
    assert not (tmp_path / "j.pth").exists()
    cannot = run_cli("convert", GAP, tmp_path / "p.safetensors", "--patch-size", "4", "--verify")
    assert cannot.exit_code == 1 and "verify cannot check a --patch-size resample" in cannot.stderr


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", "float16"), ("bfloat16", "bfloat16")])
def test_the_rounding_is_made_visible(dtype, torch_dtype, tmp_path):
    """The report says how far the rounding alone moves the output; recomputed here with
    torch's own casts of the float32 model's parameters."""
    import re

    import torch

    from vitconv.verification.verify import seeded_images

    report = vitconv.convert(SRC, tmp_path / "x.safetensors", dtype=dtype, verify=True)
    said = float(re.search(r"max abs ([0-9.e+-]+) \(cosine", report.checked.note).group(1))
    model = vitconv.load(SRC)
    x = torch.from_numpy(np.ascontiguousarray(seeded_images(2, 32, 3).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        full = model(x).double()
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, torch_dtype)).float())
        moved = model(x).double()
    assert said == pytest.approx(float((full - moved).abs().max()), rel=5e-3)
    assert said > 1e-4  # well above float32 rounding: the tolerance did not hide it


@pytest.mark.parametrize("dst,to,dtype", [
    ("h.safetensors", None, "float16"), ("hf", None, "bfloat16"), ("tdir", "timm", "float16"),
    ("b.npz", None, "bfloat16"),
])
def test_plain_verify_proves_a_rounded_file_later(dst, to, dtype, tmp_path):
    """``vitconv verify SRC FILE`` on a file written ``--dtype`` (with or without ``--verify``)
    proves it as ``convert --verify`` did, the same figures included, instead of failing the
    float32 tolerance on the rounding alone."""
    from vitconv.verification.verify import verify

    at_write = vitconv.convert(SRC, tmp_path / dst, to=to, dtype=dtype, verify=True).checked
    later = verify(SRC, tmp_path / dst)
    assert later.ok and len(later.stages) == 9 and later.tolerance == 1e-4, later.lines()
    assert f"{dtype} weights" in later.kind and later.note == at_write.note
    assert [s.max_abs for s in later.stages] == [s.max_abs for s in at_write.stages]
    f32 = tmp_path / ("f32_" + dst)
    vitconv.convert(SRC, f32, to=to)
    plain = verify(SRC, f32)
    assert plain.ok and plain.note == "" and "weights" not in plain.kind


def test_plain_verify_names_a_tensor_that_is_not_the_rounding(tmp_path):
    """One float16 ulp off in one tensor: verify fails on the weights, naming the tensor, exit 3,
    where a float32 tolerance loose enough for the rounding would have passed it."""
    from safetensors.numpy import load_file, save_file

    from vitconv.verification.verify import verify

    good = tmp_path / "h.safetensors"
    vitconv.convert(SRC, good, dtype="float16")
    tensors = load_file(good)
    with safe_open(str(good), "np") as f:
        meta = f.metadata()
    tensors["blocks.1.mlp.fc2.weight"] = np.nextafter(tensors["blocks.1.mlp.fc2.weight"], np.float16(0))
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    report = verify(SRC, tmp_path / "bad.safetensors")
    assert not report.ok and report.first_failure.name == "weights"
    assert report.first_failure.note == ("blocks.1.mlp.fc2.weight: the written tensor is not the float32 weight "
                                         "rounded to float16")
    assert verify(SRC, tmp_path / "bad.safetensors", tolerance=1e-2).first_failure.name == "weights"
    r = run_cli("verify", SRC, tmp_path / "bad.safetensors")
    assert r.exit_code == 3 and "blocks.1.mlp.fc2.weight" in r.output, r.output


def test_num_heads_and_set_reach_a_bare_converted_file(tmp_path):
    """A bare timm state dict records neither its head count nor its GELU. The tiny model's
    48-wide attention is not 64-dim heads (as SigLIP so400m's 16 heads of 72, which 64-dim
    heads would make 18), and its GELU is tanh where timm's default is exact: verify's
    --num-heads and --set go to the converted file when the source records them; a wrong
    value is another model, failing where it acts; one both files record is refused."""
    from vitconv.errors import BadInputError, MappingError
    from vitconv.verification.verify import verify

    vitconv.convert(SRC, tmp_path / "t.pth", to="timm")
    with pytest.raises(MappingError, match="pass --num-heads"):
        verify(SRC, tmp_path / "t.pth")
    as_timm_reads_it = verify(SRC, tmp_path / "t.pth", num_heads=3)  # timm's default GELU: exact
    assert as_timm_reads_it.first_failure.name == "blocks.0.mlp"
    right = dict(num_heads=3, overrides={"act": "gelu_tanh"})
    assert verify(SRC, tmp_path / "t.pth", **right).ok
    r = run_cli("verify", SRC, tmp_path / "t.pth", "--num-heads", "3", "--set", "act=gelu_tanh")
    assert r.exit_code == 0 and "OK: 9 stage(s)" in r.output, r.output
    vitconv.convert(SRC, tmp_path / "h.pth", to="timm", dtype="float16")
    half = verify(SRC, tmp_path / "h.pth", **right)
    assert half.ok and "float16 weights" in half.kind
    assert verify(SRC, tmp_path / "t.pth", num_heads=1, overrides={"act": "gelu_tanh"}).first_failure.name \
        == "blocks.0.attn"
    vitconv.convert(SRC, tmp_path / "c.safetensors")  # records both, as the source does
    with pytest.raises(BadInputError, match="num_heads: both files record it"):
        verify(SRC, tmp_path / "c.safetensors", num_heads=3)
