"""``convert --dtype float16|bfloat16 --verify`` runs the float32 twin of the rounded file once:
verify judges that pass stage by stage, and the same pass is what the rounding's effect on the
output is measured from (each pass reads every block of the file again). The printed figure
of that effect is checked against Google's NumPy reference run on the source's weights,
exact and rounded by NumPy / ml_dtypes (never by vitconv)."""

from __future__ import annotations

import re
from collections import Counter

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from _vitconv_cli.main import main
from conftest import golden_path
from vitconv.conversion import loading
from vitconv.verification.references.google_numpy import GoogleViTReference, load_npz

SRC = golden_path("jax/tiny_token_p8_32.npz")
ROUNDED = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _convert(tmp_path, dtype: str) -> str:
    r = CliRunner().invoke(main, ["convert", str(SRC), str(tmp_path / "h.safetensors"), "--dtype", dtype, "--verify"])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("dtype", sorted(ROUNDED))
def test_the_float32_twin_runs_once(tmp_path, monkeypatch, dtype):
    """Two models run, each once: the rounded file as written and its float32 twin (before,
    the twin ran a second time for the rounding's figure)."""
    passes: Counter = Counter()
    forward = loading.StreamedModel.forward_stages

    def counted(self, images):
        passes[id(self)] += 1
        return forward(self, images)

    monkeypatch.setattr(loading.StreamedModel, "forward_stages", counted)
    out = _convert(tmp_path, dtype)
    assert "verified  OK: 9 stage(s) within tolerance" in out
    assert sorted(passes.values()) == [1, 1], passes


def _logits(params, images: np.ndarray) -> np.ndarray:
    ref = GoogleViTReference(params)
    return ref.forward_stages(images)["logits"]


@pytest.mark.parametrize("dtype", sorted(ROUNDED))
def test_the_rounding_figure_is_the_rounded_weights_against_the_exact_ones(tmp_path, dtype):
    out = _convert(tmp_path, dtype)
    said = re.search(r"moves the output by max abs ([0-9.e+-]+) \(cosine ([0-9.]+)\) on the same images", out)
    assert said, out
    max_abs, cosine = float(said.group(1)), float(said.group(2))

    exact = load_npz(SRC)
    rounded = {k: v.astype(ROUNDED[dtype]).astype(np.float64) for k, v in exact.items()}
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)  # verify's seeded pair
    want, got = _logits(exact, images), _logits(rounded, images)
    numpy_max_abs = float(np.abs(got - want).max())
    numpy_cosine = float(min(np.dot(g, w) / (np.linalg.norm(g) * np.linalg.norm(w)) for g, w in zip(got, want)))
    assert abs(max_abs - numpy_max_abs) <= 0.01 * numpy_max_abs, (max_abs, numpy_max_abs)
    assert abs(cosine - numpy_cosine) <= 1e-6, (cosine, numpy_cosine)
