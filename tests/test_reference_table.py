"""The table of references (``vitconv.verification.references.table``): one row per layout says
how its reference is opened, and both ``verify`` and ``golden`` take their answer from it. The
references it opens are judged against outputs computed by someone else's code (Google's Flax,
big_vision's JAX: the golden files), never against the converter."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

import vitconv
from conftest import CASES, golden_expected, golden_path
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.errors import BadInputError
from vitconv.verification import golden
from vitconv.verification.references import table
from vitconv.verification.references.library import LAYOUTS as LIBRARY_LAYOUTS
from vitconv.verification.verify import reference_for, verify

GOOGLE_CASE = CASES["tiny_token_p8_32"]


def _case_input(case) -> np.ndarray:
    return np.load(golden_path(case["input"])).astype(np.float32)


@pytest.mark.parametrize("name, kind", [("tiny_token_p8_32", "GoogleViTReference"),
                                        ("bv_tiny_tok_p8_32", "BigVisionReference")])
def test_each_npz_layout_opens_its_numpy_reference_which_reproduces_the_golden_logits(name, kind):
    case = CASES[name]
    path = golden_path(case["checkpoint"])
    with open_checkpoint(path) as ckpt:
        ref = reference_for(path, ckpt)
    try:
        assert type(ref).__name__ == kind
        assert ref.reference_dtype == "float64"
        got = ref.forward_stages(_case_input(case))["logits"]
    finally:
        ref.close()
    err = float(np.abs(got - golden_expected(case, "logits")).max())
    assert err <= case["tolerance"]["max_abs"], err


def test_the_rows_are_the_layouts_that_had_a_reference():
    """Google and big_vision .npz and every layout the library reference builds; nothing else
    (a vitconv canonical file has no reference: it would prove the converter by itself)."""
    assert set(table.REFERENCES) == {"google", "big_vision", *LIBRARY_LAYOUTS}
    assert table.has_reference("google") and table.has_reference("hf_dinov2") and table.has_reference("timm")
    assert not table.has_reference("canonical") and not table.has_reference("jeonsworld")


def test_a_layout_without_a_reference_is_refused_in_one_line(tmp_path):
    vitconv.convert(golden_path(GOOGLE_CASE["checkpoint"]), tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt, pytest.raises(BadInputError) as e:
        reference_for(tmp_path / "m.safetensors", ckpt)
    text = str(e.value)
    assert "verify has no reference for the canonical layout (references: Google .npz files and hf, " in text
    assert "\n" not in text
    # golden asks the same table: no reference figure for that layout, and no failure either
    case = {**GOOGLE_CASE, "checkpoint": str(tmp_path / "m.safetensors"), "sha256": {}}
    result = golden.check_case(case, golden_path(""))
    assert result.ok and {f.engine for f in result.figures} == {"converted"}


def test_one_new_row_gives_verify_and_golden_a_reference(tmp_path, monkeypatch):
    """The table is the only place that decides: a row for the canonical layout (here, the
    Google reference of the file it was converted from) is used by both."""
    npz = golden_path(GOOGLE_CASE["checkpoint"])
    vitconv.convert(npz, tmp_path / "m.safetensors")
    rows = {**table.REFERENCES, "canonical": lambda src, ckpt, dtype: table.google_npz(npz, ckpt, dtype)}
    monkeypatch.setattr(table, "REFERENCES", MappingProxyType(rows))

    report = verify(tmp_path / "m.safetensors")
    assert report.ok and report.reference.startswith("Google .npz, NumPy float64 reference"), report.lines()
    assert [s.name for s in report.stages][:2] == ["embed", "blocks.0.attn"]

    case = {**GOOGLE_CASE, "checkpoint": str(tmp_path / "m.safetensors"), "sha256": {}}
    result = golden.check_case(case, golden_path(""))
    assert result.ok
    reference = {f.what: f.max_abs for f in result.figures if f.engine == "reference"}
    assert set(reference) == {"logits", "pooled", "prelogits"}
    assert reference["logits"] <= GOOGLE_CASE["tolerance"]["max_abs"]


def test_google_opener_names_the_file_and_the_problem(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        table.google_npz(tmp_path / "missing.npz", None)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match=r"bad\.npz: corrupt or truncated \.npz archive"):
        table.google_npz(tmp_path / "bad.npz", None)
    np.savez(tmp_path / "other.npz", a=np.zeros(3, np.float32))
    with pytest.raises(BadInputError, match="not a Google ViT checkpoint the reference understands"):
        table.google_npz(tmp_path / "other.npz", None)
