"""The model card (README.md) of directory outputs: source and sha256 (checked with hashlib),
the verification figures (checked against ``vitconv verify`` run afterwards on the directory
that appeared), Hub front matter, and what it says when it cannot verify."""

from __future__ import annotations

import hashlib
import re

import vitconv
from conftest import golden_path
from vitconv.verification.verify import verify

SRC = golden_path("jax/tiny_token_p8_32.npz")


def _front_matter(text: str) -> dict:
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    out, key = {}, None
    for line in lines[1:end]:
        if line.startswith("  - "):
            out[key].append(line[4:])
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            out[key] = value if value else []
    return out


def test_hf_directory_card_states_source_and_verification(tmp_path):
    vitconv.convert(SRC, tmp_path / "hf", labels=[f"c{i}" for i in range(10)])
    card = (tmp_path / "hf" / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-classification"
    assert "vitconv" in front["tags"]
    assert hashlib.sha256(SRC.read_bytes()).hexdigest() in card
    assert "ViT depth 2 width 48 heads 3x16" in card and "from `c0` to `c9`" in card
    assert "mean (0.5, 0.5, 0.5)" in card and "vitconv.convert(" in card
    after = verify(SRC, tmp_path / "hf")  # the same check, on the directory as it now is
    assert after.ok and "OK:" in card
    rows = dict(re.findall(r"^\| ([^|]+) \| ([0-9.e+-]+) \|", card, re.M))
    assert len(rows) == len(after.stages)
    for s in after.stages:
        assert rows[s.what.strip()] == f"{s.max_abs:.3g}", s.what


def test_timm_directory_card_and_the_cases_it_cannot_verify(tmp_path):
    vitconv.convert(SRC, tmp_path / "timm", to="timm")
    assert _front_matter((tmp_path / "timm" / "README.md").read_text())["library_name"] == "timm"
    vitconv.convert(SRC, tmp_path / "new", to="timm", num_classes=3)
    assert "Not verified: the classifier was replaced" in (tmp_path / "new" / "README.md").read_text()
    vitconv.convert(SRC, tmp_path / "m.safetensors")  # verify has no reference for a vitconv file
    vitconv.convert(tmp_path / "m.safetensors", tmp_path / "again", to="hf")
    text = (tmp_path / "again" / "README.md").read_text()
    assert "Not verified: " in text and "no reference for the canonical layout" in text
