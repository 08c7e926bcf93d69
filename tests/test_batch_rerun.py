"""A rerun of a manifest without ``--report`` decides from what each output records, whatever
its kind: a vitconv ``.pt`` keeps the batch's provenance as a safetensors header does."""

from __future__ import annotations

import json

import torch

from conftest import golden_path
from vitconv.conversion.batch import run_batch


def test_a_rerun_skips_pt_and_safetensors_rows_alike(tmp_path):
    rows = [{"src": str(golden_path("jax/tiny_token_p8_32.npz")), "dst": str(tmp_path / "zoo" / "a.pt")},
            {"src": str(golden_path("jax/tiny_gap_p8_32.npz")), "dst": str(tmp_path / "zoo" / "b.safetensors")}]
    (tmp_path / "zoo").mkdir()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**r, "verify": False}) + "\n" for r in rows))
    first = run_batch(manifest, workers=1)
    assert [r.status for r in first.rows] == ["ok", "ok"], [r.error for r in first.rows]
    written = {p.name: p.read_bytes() for p in (tmp_path / "zoo").iterdir()}
    again = run_batch(manifest, workers=1)
    assert [r.status for r in again.rows] == ["skipped", "skipped"], [r.error for r in again.rows]
    # what the summary says of a row that asked for no verification
    assert all(r.line_text().endswith("(already converted from the same source; not verified, as the row asks)")
               for r in again.rows), [r.line_text() for r in again.rows]
    assert {p.name: p.read_bytes() for p in (tmp_path / "zoo").iterdir()} == written


def test_a_rerun_of_verified_pt_rows_skips_them(tmp_path):
    """The default row verifies: its ``.pt`` records ``vitconv_verified`` beside the row and the
    fingerprint, and a rerun without ``--report`` skips it as it skips a safetensors row."""
    rows = [{"src": str(golden_path("jax/tiny_token_p8_32.npz")), "dst": str(tmp_path / "zoo" / "a.pt")},
            {"src": str(golden_path("jax/tiny_gap_p8_32.npz")), "dst": str(tmp_path / "zoo" / "b.pth"), "to": "timm"},
            {"src": str(golden_path("jax/tiny_gap_p8_32.npz")), "dst": str(tmp_path / "zoo" / "c.safetensors")}]
    (tmp_path / "zoo").mkdir()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = run_batch(manifest, workers=1)
    assert [r.status for r in first.rows] == ["ok", "ok", "ok"], [r.error for r in first.rows]
    assert torch.load(tmp_path / "zoo" / "a.pt", weights_only=True)["vitconv_verified"] == "true"
    written = {p.name: p.read_bytes() for p in (tmp_path / "zoo").iterdir()}
    again = run_batch(manifest, workers=1)
    # a timm .pth is a bare state dict: it has no place for provenance, so its row is converted again
    assert [r.status for r in again.rows] == ["skipped", "ok", "skipped"], [r.error for r in again.rows]
    assert {p.name: p.read_bytes() for p in (tmp_path / "zoo").iterdir()} == written
