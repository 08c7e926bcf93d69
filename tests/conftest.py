"""Shared fixtures: the golden manifest and helpers to run cases. Nothing touches the network,
and nothing is written outside temporary directories (hypothesis included)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import configuration as _hypothesis_configuration
from hypothesis import settings

# hypothesis keeps its example database and state under .hypothesis/ in the working directory;
# send it to a temporary directory that goes with the session, and keep no database.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="vitconv-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)
_hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("vitconv", database=None)
settings.load_profile("vitconv")

#: The installed ``vitconv`` command: the one beside this interpreter (a virtual environment's
#: bin/ need not be on PATH).
VITCONV = str(Path(sys.executable).with_name("vitconv"))

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}
#: Google's own cases (``golden/jax``: every output, the NumPy reference); the others are the
#: modern families' (``golden/families``: the library's output only)
GOOGLE_CASES = {n: c for n, c in CASES.items() if c["checkpoint"].startswith("jax/")}
FAMILY_CASES = {n: c for n, c in CASES.items() if n not in GOOGLE_CASES}


def golden_path(rel: str) -> Path:
    return GOLDEN / rel


def golden_input(case: dict) -> torch.Tensor:
    """The case's NHWC input batch as an NCHW float32 tensor."""
    return torch.from_numpy(np.load(golden_path(case["input"]))).permute(0, 3, 1, 2).contiguous()


def golden_expected(case: dict, what: str) -> np.ndarray:
    return np.load(golden_path(case["expected"][what]))


@pytest.fixture(params=sorted(GOOGLE_CASES), ids=sorted(GOOGLE_CASES))
def case(request) -> dict:
    return GOOGLE_CASES[request.param]


def skip_unless_installed(what: str) -> None:
    """Skip for a missing third-party reference (vit-pytorch, timm: installed with ``--no-deps``
    by the README's test command). Under ``VITCONV_REQUIRE_REFERENCES=1``, which ``.ci/run``
    sets, a missing reference fails instead, so CI can never pass by skipping it."""
    import os

    if os.environ.get("VITCONV_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"{what} (VITCONV_REQUIRE_REFERENCES=1)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def read(path, **kwargs):
    """``(layout name, config, canonical state, notes)`` of a checkpoint, through the one path."""
    from vitconv.pipeline import open_checkpoint

    with open_checkpoint(path, **kwargs) as c:
        return c.layout.name, c.config, c.state_dict(), c.notes


#: Trained DINOv2 LayerScale values run from about 2e-4 to 11: seeded scales span that range.
LAYER_SCALE_RANGE = (2e-4, 11.0)


def seeded(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter far from its init, so each feature moves the output well above float32
    rounding: weights, norms and biases N(0, scale^2); LayerScale vectors (``.gamma``, HF's
    ``lambda1``) log-uniform over :data:`LAYER_SCALE_RANGE`. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (float(np.log(v)) for v in LAYER_SCALE_RANGE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma") or name.endswith("lambda1"):
                p.copy_(torch.exp(torch.empty(p.shape).uniform_(lo, hi, generator=g)))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()
