"""``vitconv inspect``: reports on every format, the key audit, ``--json``, the position-embedding
plot, and shell completion. Expected values come from the golden manifest (written by the
generator from Google's code), from the files' own bytes, or from independent formulations."""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _vitconv_cli.main import main
from conftest import CASES, golden_path
from vitconv.tools.plot import posembed_cosine_grid

TOKEN = "jax/tiny_token_p8_32.npz"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_json(*args, converts: bool = True) -> dict:
    """The --json report; a file that would not convert still gets one, with exit status 2."""
    r = run("inspect", *args, "--json")
    assert r.exit_code == (0 if converts else 2), r.output
    if not converts:
        assert r.stderr.startswith("vitconv: error: ") and "would not convert" in r.stderr
    return json.loads(r.stdout)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def npz_shapes(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].shape for k in z.files}


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["tiny_token_p8_32", "tiny_gap_p8_32", "tiny_prelogits_p8_32",
                                  "tiny_token_p4_48", "tiny_r50_32"])
def test_golden_npz_report_matches_the_manifest(name):
    case = CASES[name]
    path = golden_path(case["checkpoint"])
    d = run_json(path)
    assert d["schema"] == "vitconv.tools.inspection/1" and d["kind"] == "checkpoint"
    assert d["format"] == "npz" and d["layout"] == "google"
    assert d["num_params"] == case["num_params"]
    shapes = npz_shapes(path)
    assert d["num_tensors"] == len(shapes) and d["dtypes"] == {"float32": len(shapes)}
    assert d["file_size"] == path.stat().st_size and d["sha256"] == sha256(path)
    assert d["audit"] == {"ok": True, "missing": [], "unused": [], "ignored": [], "error": None}
    arch = {a["name"]: a for a in d["architecture"]}
    # Values cross-checked against the tensors' shapes read here with numpy, not by vitconv.
    emb = shapes["embedding/kernel"]
    q = shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    assert arch["patch_size"]["value"] == emb[0] and arch["width"]["value"] == emb[3]
    assert (arch["num_heads"]["value"], arch["head_dim"]["value"]) == (q[1], q[2])
    assert arch["depth"]["value"] == len({k.split("/")[1] for k in shapes if "encoderblock_" in k})
    assert arch["classifier"]["value"] == ("token" if "cls" in shapes else "gap")
    assert arch["width"]["source"] == "embedding/kernel [3]"
    assert arch["num_heads"]["source"].endswith("query/kernel [1]")
    assert arch["act"]["source"].startswith("google layout convention")
    assert ("resnet_layers" in arch) == ("conv_root/kernel" in shapes)


def test_text_report_has_the_architecture_table():
    r = run("inspect", golden_path(TOKEN))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(l.startswith("layout") and l.split()[1:3] == ["google", "(Google"] for l in lines)
    assert any(l.split() == ["params", "48,634"] for l in lines)
    assert any(l.split()[:3] == ["width", "48", "embedding/kernel"] for l in lines)
    assert "field" in r.output and "read from" in r.output
    assert "audit    ok" in r.output


def test_progress_callback_sees_every_byte_and_quiet_prints_nothing():
    from vitconv.tools.inspection import inspect_path, total_bytes

    path = golden_path("jax/tiny_r50_32.npz")
    seen = []
    report = inspect_path(path, progress=seen.append)
    assert sum(seen) == total_bytes(path) == path.stat().st_size
    assert report.files[0].sha256 == sha256(path)
    r = run("--quiet", "inspect", path)
    assert r.exit_code == 0 and r.output == ""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("converted")
    for ext in ("pt", "safetensors"):
        r = run("npz2pt", golden_path(TOKEN), "-o", d / f"vit.{ext}")
        assert r.exit_code == 0, r.output
    return d


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_converted_files_report_canonical_layout_and_config_source(converted, ext):
    path = converted / f"vit.{ext}"
    d = run_json(path)
    assert d["format"] == ext and d["layout"] == "canonical"
    assert d["num_params"] == CASES["tiny_token_p8_32"]["num_params"]
    assert d["sha256"] == sha256(path) and d["file_size"] == path.stat().st_size
    assert d["audit"]["ok"] is True
    assert d["config"]["width"] == 48 and d["config"]["num_heads"] == 3
    assert {a["source"] for a in d["architecture"] if a["name"] != "grid_size"} == {"vitconv_config metadata"}
    assert d["num_tensors"] == sum(d["dtypes"].values()) == 32


def test_safetensors_dtypes_come_from_the_header_so_bfloat16_is_reported(tmp_path, converted):
    from safetensors.torch import load_file, save_file

    src = converted / "vit.safetensors"
    tensors = load_file(src)
    half = {k: (v.to(torch.bfloat16) if k.startswith("blocks.0.") else v) for k, v in tensors.items()}
    out = tmp_path / "half.safetensors"
    save_file(half, out, metadata={"format": "pt"})
    n_bf16 = sum(k.startswith("blocks.0.") for k in tensors)
    d = run_json(out, converts=False)  # no vitconv config in the metadata: the heads are unknown
    assert d["dtypes"] == {"bfloat16": n_bf16, "float32": len(tensors) - n_bf16}


def test_audit_reports_missing_and_unused_keys_instead_of_failing(tmp_path):
    with np.load(golden_path(TOKEN), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    del arrays["head/bias"]
    arrays["extra/thing"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)

    r = run("npz2pt", bad, "-o", tmp_path / "bad.pt")  # conversion refuses the file ...
    assert r.exit_code == 2 and "head/bias" in r.output
    d = run_json(bad, converts=False)  # ... inspect explains it
    assert d["audit"]["ok"] is False
    assert d["audit"]["missing"] == ["head/bias"] and d["audit"]["unused"] == ["extra/thing"]
    assert "missing 1 key" in d["audit"]["error"]
    assert d["layout"] == "google" and d["config"]["num_classes"] == 10
    text = run("inspect", bad)
    assert text.exit_code == 2 and len(text.stderr.splitlines()) == 1
    assert "FAILED" in text.output and "head/bias" in text.output and "extra/thing" in text.output


def test_optimizer_state_outside_the_prefix_is_listed_as_ignored(tmp_path):
    with np.load(golden_path(TOKEN), allow_pickle=False) as z:
        arrays = {f"opt/target/{k}": z[k] for k in z.files}
    arrays["opt/state/step"] = np.zeros((), np.float32)
    p = tmp_path / "train_state.npz"
    np.savez(p, **arrays)
    d = run_json(p)
    assert d["prefix"] == "opt/target/" and d["audit"]["ok"] is True
    assert d["audit"]["ignored"] == ["opt/state/step"]
    assert d["num_params"] == CASES["tiny_token_p8_32"]["num_params"]


def test_unreadable_and_unknown_inputs(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all, nothing")
    r = run("inspect", junk)
    assert r.exit_code == 2 and str(junk) in r.output and "Traceback" not in r.output
    r = run("inspect", tmp_path / "nope.npz")
    assert r.exit_code == 2 and "no such file" in r.output
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones((2, 3), np.float32), b=np.ones(4, np.float64))
    d = run_json(other, converts=False)
    assert d["layout"] is None and d["audit"]["ok"] is False and "not a ViT" in d["audit"]["error"]
    assert d["num_params"] == 10 and d["dtypes"] == {"float32": 1, "float64": 1}


# ---------------------------------------------------------------------------- onnx
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """A real dynamo export of a golden model (slowest fixture here, ~10 s), with metadata."""
    import onnx

    import vitconv

    model = vitconv.load(golden_path(TOKEN))
    path = tmp_path_factory.mktemp("onnx") / "vit.onnx"
    prog = torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), dynamo=True,
                             input_names=["pixel_values"], output_names=["logits"],
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    prog.save(str(path))
    m = onnx.load(str(path))
    onnx.helper.set_model_props(m, {"vitconv.source": "tiny_token_p8_32.npz", "note": "test"})
    onnx.save(m, str(path))
    return path


def test_onnx_report(onnx_file):
    import collections

    import onnx

    d = run_json(onnx_file)
    m = onnx.load(str(onnx_file))
    assert d["kind"] == "onnx" and d["format"] == "onnx"
    assert d["sha256"] == sha256(onnx_file) and d["file_size"] == onnx_file.stat().st_size
    assert d["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert d["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    assert d["metadata"] == {"vitconv.source": "tiny_token_p8_32.npz", "note": "test"}
    assert d["opsets"] == {(o.domain or "ai.onnx"): o.version for o in m.opset_import}
    assert d["opsets"]["ai.onnx"] >= 18  # the dynamo exporter's floor
    assert d["num_nodes"] == len(m.graph.node)
    hist = collections.Counter(n.op_type for n in m.graph.node)
    assert len(d["op_types"]) == min(10, len(hist))
    assert all(hist[o["op"]] == o["count"] for o in d["op_types"])
    assert d["op_types"][0]["count"] == max(hist.values())
    # Initializers hold the weights (constants folded in may add a few elements).
    assert d["num_params"] >= CASES["tiny_token_p8_32"]["num_params"]
    assert d["external_data"] is False
    text = run("inspect", onnx_file)
    assert text.exit_code == 0 and "pixel_values: float32 [batch, 3, 32, 32]" in text.output


def test_onnx_plot_is_refused_with_one_line(onnx_file, tmp_path):
    r = run("inspect", onnx_file, "--plot-posembed", tmp_path / "x.png")
    assert r.exit_code == 2 and "not an ONNX graph" in r.output
    assert not (tmp_path / "x.png").exists()


def test_corrupt_onnx_is_bad_input(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"\x08\x07garbage-that-is-not-protobuf" * 3)
    r = run("inspect", p)
    assert r.exit_code == 2 and "not a readable ONNX model" in r.output


# ---------------------------------------------------------------------------- posembed
def cosine_reference(pos_embed: np.ndarray, prefix: int) -> np.ndarray:
    """Pairwise cosine similarity written independently: scipy's cosine distance, pair by pair."""
    from scipy.spatial.distance import cosine

    rows = pos_embed.reshape(-1, pos_embed.shape[-1])[prefix:].astype(np.float64)
    g = int(np.sqrt(len(rows)))
    out = np.empty((g, g, g, g))
    for a in range(g * g):
        for b in range(g * g):
            out[a // g, a % g, b // g, b % g] = 1.0 - cosine(rows[a], rows[b])
    return out


@pytest.mark.parametrize("name,prefix", [("tiny_token_p8_32", 1), ("tiny_gap_p8_32", 0),
                                         ("tiny_token_p4_48", 1)])
def test_cosine_grid_matches_independent_computation(name, prefix):
    with np.load(golden_path(CASES[name]["checkpoint"]), allow_pickle=False) as z:
        pe = z["Transformer/posembed_input/pos_embedding"]
    sim = posembed_cosine_grid(pe, prefix)
    ref = cosine_reference(pe, prefix)
    assert sim.shape == ref.shape
    assert np.abs(sim - ref).max() < 1e-12


def test_cosine_grid_orientation_and_errors():
    # Embeddings that encode (row, col) exactly: patch (1, 2) of a 3x3 grid is identical
    # to itself only, orthogonal to others sharing nothing.
    g = 3
    pe = np.zeros((1, 1 + g * g, 2 * g))
    pe[0, 0] = 5.0  # class token: must be ignored
    for i in range(g):
        for j in range(g):
            pe[0, 1 + i * g + j, i] = 1.0
            pe[0, 1 + i * g + j, g + j] = 1.0
    sim = posembed_cosine_grid(pe, 1)
    assert sim[1, 2, 1, 2] == pytest.approx(1.0)
    assert sim[1, 2, 1, 0] == pytest.approx(0.5) and sim[1, 2, 0, 2] == pytest.approx(0.5)
    assert sim[1, 2, 0, 0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="square grid"):
        posembed_cosine_grid(np.ones((1, 11, 4)), 1)
    zero = np.zeros((4, 3))
    assert np.array_equal(posembed_cosine_grid(zero, 0), np.zeros((2, 2, 2, 2)))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("src", [TOKEN, "jax/tiny_gap_p8_32.npz"])
def test_plot_posembed_writes_a_png_of_the_documented_size(tmp_path, src):
    pytest.importorskip("matplotlib", reason="the plot needs the 'plot' extra")
    from PIL import Image

    out = tmp_path / "pe.png"
    r = run("inspect", golden_path(src), "--plot-posembed", out)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "4x4 grid" in r.output
    assert png_size(out) == (900, 800)  # 9 x 8 inches at 100 dpi, documented in vitconv.tools.plot
    with Image.open(out) as im:
        im.verify()
    assert [p.name for p in tmp_path.iterdir()] == ["pe.png"]  # no temporary left behind


def test_fine_grids_get_an_integer_resolution_scale():
    from vitconv.tools.plot import figure_pixels

    # ViT-B/16 at 224 (14x14) fits 900x800; at 384 (24x24) each cell needs the 3x dpi.
    assert figure_pixels(14) == (900, 800)
    assert figure_pixels(24) == (2700, 2400)


def test_plot_with_json_keeps_stdout_pure_json(tmp_path, converted):
    pytest.importorskip("matplotlib", reason="the plot needs the 'plot' extra")
    out = tmp_path / "pe.png"
    r = CliRunner().invoke(main, ["inspect", str(converted / "vit.pt"), "--json",
                                  "--plot-posembed", str(out)])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["layout"] == "canonical"
    assert out.exists()


def test_missing_matplotlib_is_one_line_exit_1(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "pe.png"
    r = run("inspect", golden_path(TOKEN), "--plot-posembed", out)
    assert r.exit_code == 1
    assert "needs matplotlib" in r.output and "vitconv[plot]" in r.output
    assert "Traceback" not in r.output and not out.exists()


# ---------------------------------------------------------------------------- completion
def _complete(env: dict) -> str:
    """What the shell hook gets: click answers completion requests inside ``main`` itself,
    so the runner (which sets the environment) exercises the same path as the shell."""
    r = CliRunner().invoke(main, [], prog_name="vitconv", env=env)
    assert r.exit_code == 0, r.output
    return r.output


def test_bash_completion_script_generates_and_completes_commands():
    script = _complete({"_VITCONV_COMPLETE": "bash_source"})
    assert "_vitconv_completion()" in script
    assert "complete -o nosort -F _vitconv_completion vitconv" in script
    words = _complete({"_VITCONV_COMPLETE": "bash_complete", "COMP_WORDS": "vitconv ins",
                       "COMP_CWORD": "1"})
    assert "plain,inspect" in words.splitlines()
    opts = _complete({"_VITCONV_COMPLETE": "bash_complete", "COMP_WORDS": "vitconv inspect --pl",
                      "COMP_CWORD": "2"})
    assert "plain,--plot-posembed" in opts.splitlines()
