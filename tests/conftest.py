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
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import configuration as _hypothesis_configuration
from hypothesis import settings
from vitconv.conversion.options import ReadOptions

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
    if os.environ.get("VITCONV_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"{what} (VITCONV_REQUIRE_REFERENCES=1)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def read(path, **kwargs):
    """``(layout name, config, canonical state, notes)`` of a checkpoint, through the one path."""
    from vitconv.conversion.pipeline import open_checkpoint

    with open_checkpoint(path, ReadOptions(**kwargs)) as c:
        return c.layout.name, c.config, c.state_dict(), c.notes


#: Trained DINOv2 LayerScale values run from about 2e-4 to 11: seeded scales span that range.
LAYER_SCALE_RANGE = (2e-4, 11.0)


#: LayerScale vectors' names: timm's and DINOv2's ``gamma``, BEiT's and timm Eva's ``gamma_1``/``gamma_2``,
#: Hugging Face BEiT's ``lambda_1``/``lambda_2`` (and Hugging Face DINOv2's ``...lambda1``).
LAYER_SCALE_NAMES = ("gamma", "gamma_1", "gamma_2", "lambda_1", "lambda_2")


def seeded(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter far from its init, so each feature moves the output well above float32
    rounding: weights, norms and biases N(0, scale^2); LayerScale vectors log-uniform over
    :data:`LAYER_SCALE_RANGE` under each library's names (:data:`LAYER_SCALE_NAMES`). Returns the
    model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (float(np.log(v)) for v in LAYER_SCALE_RANGE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in LAYER_SCALE_NAMES or name.endswith("lambda1"):
                p.copy_(torch.exp(torch.empty(p.shape).uniform_(lo, hi, generator=g)))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def images(h: int = 32, w: Optional[int] = None, seed: int = 1) -> torch.Tensor:
    """Two seeded N(0, 1) NCHW images of ``h`` x ``w`` (square, 32 px by default)."""
    return torch.randn(2, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


def close_to(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> float:
    """Assert ``max|got - want| <= rel * max(1, max|want|)`` (the families' bar); the max abs."""
    err = (got - want).abs().max().item()
    assert err <= rel * max(1.0, want.abs().max().item()), err
    return err


def save_state(model: torch.nn.Module, path) -> Path:
    """``model``'s state dict as a ``.safetensors`` file (contiguous tensors)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


#: Structural edits of a state dict for hypothesis (``st.lists(...)``): (which key, what, a number).
STRUCTURAL_EDIT_KINDS = ("dim", "add_axis", "drop_axis", "delete", "rename")


def structurally_edited(arrays: dict, edits) -> dict:
    """``arrays`` with ``edits`` applied, the way a wrong or hand-edited checkpoint goes wrong:
    a dimension changed, an axis added or dropped (the tensor then zeros of the new shape), a key
    deleted or renamed. Each edit is ``(pick, kind, n)``: the key ``sorted(arrays)[pick % len]``."""
    a, keys = dict(arrays), sorted(arrays)
    for pick, kind, n in edits:
        k = keys[pick % len(keys)]
        if k not in a:
            continue
        s = list(a[k].shape)
        if kind == "dim" and s:
            s[n % len(s)] = n
        elif kind == "add_axis":
            s.append(n % 3 + 1)
        elif kind == "drop_axis" and s:
            s.pop()
        elif kind == "delete":
            del a[k]
            continue
        elif kind == "rename":
            a[k.replace("0", str(n % 10))] = a.pop(k)
            continue
        a[k] = np.zeros(s, np.float32)
    return a


# ---------------------------------------------------------------------------- tiers
#: The suite's tiers. `python -m pytest` (the README's command) runs the default tier: every
#: test not listed here. `.ci/run` runs it, then `-m "slow or system"`. Durations are in
#: BENCHMARKS.md ("The test suite").
#: ``system``: whole modules that start other machinery (worker processes, Ray, a moto S3
#: server, killed children) or run every README command end to end.
SYSTEM_MODULES = {
    "test_readme.py": "runs every command the README shows",
    "test_batch.py": "worker processes, Ray, killed and interrupted workers",
    "test_batch_storage.py": "a moto S3 server and an HTTP server on 127.0.0.1, Ray tasks",
    "test_batch_rerun.py": "worker processes",
    "test_atomic.py": "children killed by SIGKILL, SIGINT and SIGTERM at chosen moments",
    "test_bench.py": "benchmarks in fresh processes",
    "test_same_file.py": "every writing command as a child process, batch workers, a silent HTTP server",
}
#: ``slow``: single tests of 5 s or more on this 2-core machine while it is busy (all of a
#: test's parameters). Each is still in CI.
SLOW_TESTS = (
    "test_bad_inputs.py::test_export_reports_a_full_disk_instead_of_aborting",
    "test_bad_inputs.py::test_long_and_undecodable_output_names",
    "test_export_families.py::test_timm_family_exports_to_onnx_with_dynamic_size",
    "test_export_families.py::test_fp16_onnx_keeps_the_rotary_angles_float32",
    "test_aimv2.py::test_aimv2_exports_to_onnx_with_dynamic_size",
    "test_eva.py::test_eva02_onnx_dynamic_size_follows_timm_at_unseen_sizes",
    "test_hostile.py::test_hostile_inputs_one_line_exit_2_bounded",
    "test_hostile.py::test_other_commands_one_line_exit_2_bounded",
    "test_hostile.py::test_odd_images_predict_quietly_within_the_limits",
    "test_hostile.py::test_zip_bomb_in_optimizer_state_is_never_read",
    "test_hostile.py::test_safetensors_detected_whatever_its_header_length",
    "test_hostile.py::test_valid_but_unusual_inputs_convert_to_the_same_model",
    "test_export_onnx.py::test_plain_verify_judges_a_float16_graph_as_export_does",
    "test_export_onnx.py::test_external_data_export_verifies_like_the_inline_one",
    "test_export_onnx.py::test_the_parity_run_reads_the_written_file_s_own_bytes",
    "test_export_onnx.py::test_hybrid_r50_exports_and_matches_golden",
    "test_export_onnx.py::test_single_self_contained_file_passing_full_check",
    "test_export_onnx.py::test_a_handed_over_model_is_freed_once_its_weights_are_written",
    "test_export_other.py::test_every_target_in_one_run_with_the_model_handed_to_the_last",
    "test_predict.py::test_hf_pipeline_agrees_with_predict",
    "test_big_vision.py::test_exports_with_dynamic_size",
    "test_verify_libraries.py::test_timm_state_dict_and_directory",
    "test_convert_verify.py::test_plain_verify_proves_a_rounded_file_later",
    "test_onnx_inputs.py::test_forged_and_foreign_onnx_inputs_fail_in_one_line",
    "test_predict_images.py::test_postscript_and_other_formats_named_as_images_never_run_a_program",
    "test_siglip2.py::test_onnx_dynamic_size_export_computes_siglip2_at_non_square_sizes",  # 15-20 s busy
    "test_siglip2.py::test_verify_runs_siglip2_and_naflexvit_as_their_own_references",  # 9-14 s busy
    "test_dinov3.py::test_onnx_dynamic_size_follows_timm_at_unseen_sizes",
    "test_dinov3.py::test_verify_runs_the_library_as_the_reference",
    "test_beit.py::test_timm_beit_exports_to_onnx_and_torchscript_with_dynamic_size",
    "test_beit.py::test_hf_beit_exports_to_onnx_with_dynamic_size",
    # the streamed ONNX export against the whole-model one: two exports and their parity runs each (9-26 s busy)
    "test_export_streamed.py::test_streamed_file_is_the_whole_model_file",
    "test_export_streamed.py::test_no_weight_is_held_by_the_trace_and_each_weight_is_read_as_it_is_written",
    "test_export_streamed.py::test_rotary_and_relative_bias_families_stream_to_the_same_file",
    "test_export_streamed.py::test_relative_bias_family_streams_with_dynamic_size",
    "test_export_streamed.py::test_streamed_fp16_file_is_the_whole_model_fp16_file",
    "test_export_streamed.py::test_equal_weights_are_merged_only_by_the_whole_model_export",
    "test_export_streamed.py::test_cli_streamed_and_whole_flags",
    "test_export_streamed.py::test_each_block_part_reads_only_its_blocks_weights",
    # the block-by-block library references against the whole-model ones (5-10 s busy each)
    "test_library_streamed.py::test_hugging_face_directory_streamed_equals_from_pretrained",
    "test_library_streamed.py::test_timm_state_dict_and_directory_streamed",
    "test_library_streamed.py::test_verify_runs_the_streamed_reference_and_a_bad_file_is_still_refused",
    "test_library_streamed.py::test_synthetic_map_tower_as_a_hugging_face_directory_verifies_block_by_block",
    "test_library_streamed.py::test_bfloat16_big_vision_map_tower_converts_to_a_hugging_face_directory",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "system: starts other machinery (see tests/conftest.py SYSTEM_MODULES)")
    config.addinivalue_line("markers", "slow: 5 s or more on a busy 2-core machine (tests/conftest.py SLOW_TESTS)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(config, items):
    """Mark the tiers. A listed slow test that no longer exists in a collected module is an
    error, so a rename cannot quietly move a slow test into the default tier."""
    seen, modules = set(), set()
    for item in items:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        modules.add(module)
        if module in SYSTEM_MODULES:
            item.add_marker(pytest.mark.system)
        name = f"{module}::{getattr(item, 'originalname', item.name)}"
        if name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
            seen.add(name)
    if not any("::" in str(a) for a in config.args):  # whole modules collected
        gone = [t for t in SLOW_TESTS if t.split("::")[0] in modules and t not in seen]
        if gone:
            raise pytest.UsageError(f"tests/conftest.py SLOW_TESTS names tests that do not exist: {gone}")
