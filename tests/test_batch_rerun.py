"""A rerun of a manifest without ``--report`` decides from what each output records, whatever
its kind: a vitconv ``.pt`` keeps the batch's provenance as a safetensors header does."""

from __future__ import annotations

import json

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
