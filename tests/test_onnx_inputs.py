"""ONNX graphs as inputs to ``predict`` and ``verify``, forged or merely foreign: what the file
claims (input dims and dtype, initializer dims, external data, vitconv's metadata: config,
preprocessing, labels) is checked before onnxruntime runs it, and whatever onnxruntime still
refuses (loading or running) is one stderr line naming the file, exit 2: no traceback, no
"internal error", none of onnxruntime's own log lines (with their terminal escapes), in bounded
time and memory. Built from a real export of the golden model, edited with ``onnx``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cli_children import fork_run
from conftest import golden_path

onnx = pytest.importorskip("onnx")

GOLDEN = golden_path("jax/tiny_token_p8_32.npz")
IMAGE = golden_path("images/shapes_64x48.png")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from vitconv.runtime.export import ExportPlan, run_export

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    run_export(GOLDEN, ExportPlan(onnx=out, labels=[f"c{i}" for i in range(10)]))
    return out


def _meta(model, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _config(model) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == "vitconv_config"))


def _input(model):
    weights = {t.name for t in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in weights)


def _dims(model, dims) -> None:
    shape = _input(model).type.tensor_type.shape
    for d, v in zip(shape.dim, dims):
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = v


def _forge(name, edit):
    def make(src: Path, folder: Path) -> Path:
        m = onnx.load(str(src))
        edit(m, folder)
        out = folder / name
        onnx.save(m, str(out))
        return out
    return make


def _cfg(**changes):
    def edit(m, folder):
        _meta(m, "vitconv_config", json.dumps({**_config(m), **changes}))
    return edit


def _pre(**changes):
    def edit(m, folder):
        d = json.loads(next(p.value for p in m.metadata_props if p.key == "vitconv_preprocessing"))
        _meta(m, "vitconv_preprocessing", json.dumps({**d, **changes}))
    return edit


def _initializer_dims(m, folder):
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    del t.dims[:]
    t.dims.extend([100000, 100000])


def _int64_input(m, folder):
    _input(m).type.tensor_type.elem_type = onnx.TensorProto.INT64


def _symbolic_size(m, folder):  # dims that admit any size; the graph's position table does not
    _dims(m, ["batch", 3, "h", "w"])
    _meta(m, "vitconv_config", json.dumps({**_config(m), "image_size": 48}))


def _external(change):
    """Weights moved to ``w.data``, then one reference forged by ``change(entry dict, folder)``."""
    def edit(m, folder):
        from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

        convert_model_to_external_data(m, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
        write_external_data_tensors(m, str(folder))
        t = max(m.graph.initializer, key=lambda t: t.data_location == onnx.TensorProto.EXTERNAL)
        entries = {e.key: e for e in t.external_data}
        change(entries, folder, t)
    return edit


def _set(key, value):
    def change(entries, folder, t):
        if key in entries:
            entries[key].value = value
        else:
            t.external_data.add(key=key, value=value)
    return change


def _fifo(entries, folder, t):
    os.mkfifo(folder / "fifo.data")
    entries["location"].value = "fifo.data"


CASES = {  # name -> (forge, commands, words in the one line)
    "input_dims_8e6": (_forge("dims.onnx", lambda m, f: _dims(m, ["batch", 3, 8_000_000, 8_000_000])),
                       ("predict", "verify"), "impossible dims"),
    "input_5_channels": (_forge("c5.onnx", lambda m, f: _dims(m, ["batch", 5, 32, 32])), ("predict", "verify"),
                         "5 channels on axis 1"),
    "input_nhwc": (_forge("nhwc.onnx", lambda m, f: _dims(m, ["batch", 32, 32, 3])), ("predict", "verify"),
                   "NHWC"),
    "input_int64": (_forge("int64.onnx", _int64_input), ("predict", "verify"), "is int64"),
    "initializer_dims": (_forge("init.onnx", _initializer_dims), ("predict", "verify"), "not a loadable ONNX model"),
    "more_classes_than_labels": (_forge("labels.onnx", lambda m, f: _meta(m, "vitconv_labels", '["a", "b"]')),
                                 ("predict",), "2 labels, but the model has 10"),
    "config_classes": (_forge("classes.onnx", _cfg(num_classes=1000)), ("predict",),
                       "output has 10 values; its vitconv_config says 1000"),
    "config_image_size_8e6": (_forge("size.onnx", lambda m, f: (_dims(m, ["batch", 3, "h", "w"]),
                                                                _cfg(image_size=8_000_000)(m, f))),
                              ("predict",), "image size 8000000 is beyond"),
    "crop_1e-9": (_forge("crop.onnx", _pre(crop_pct=1e-9)), ("predict",), "vitconv_preprocessing"),
    "std_nan": (_forge("nan.onnx", _pre(std=[float("nan"), 1, 1])), ("predict",), "vitconv_preprocessing"),
    "std_zero": (_forge("zero.onnx", _pre(std=[0, 1, 1])), ("predict",), "vitconv_preprocessing"),
    "mean_text": (_forge("text.onnx", _pre(mean=["a", 1, 1])), ("predict",), "vitconv_preprocessing"),
    "run_fails": (_forge("run.onnx", _symbolic_size), ("predict",), "onnxruntime cannot run it"),
    "external_past_eof": (_forge("eof.onnx", _external(_set("offset", "999999999"))), ("predict", "verify"),
                          "lies outside w.data"),
    "external_negative": (_forge("neg.onnx", _external(_set("offset", "-64"))), ("predict", "verify"),
                          "lies outside w.data"),
    "external_length": (_forge("len.onnx", _external(_set("length", "99999999999"))), ("predict", "verify"),
                        "lies outside w.data"),
    "external_fifo": (_forge("fifo.onnx", _external(_fifo)), ("predict", "verify"), "is not a regular file"),
    "external_missing": (_forge("miss.onnx", _external(_set("location", "gone.data"))), ("predict", "verify"),
                         "does not exist"),
    "external_outside": (_forge("out.onnx", _external(_set("location", "../../etc/passwd"))), ("predict", "verify"),
                         "is not a file beside the graph"),
    "external_absolute": (_forge("abs.onnx", _external(_set("location", "/etc/passwd"))), ("predict", "verify"),
                          "is not a file beside the graph"),
}


def test_forged_and_foreign_onnx_inputs_fail_in_one_line(exported, tmp_path):
    jobs, expect = [], []
    for name, (forge, commands, words) in CASES.items():
        folder = tmp_path / name
        folder.mkdir()
        path = forge(exported, folder)
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        for command in commands:
            args = ["predict", path, IMAGE] if command == "predict" else ["verify", GOLDEN, path]
            jobs.append({"args": args, "memory": 3 << 30, "timeout": 60})
            expect.append((name, command, path, words, folder, before))
    for (code, out, err), (name, command, path, words, folder, before) in zip(fork_run(jobs, tmp_path), expect):
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, (name, command, code, err)
        assert lines[0].startswith(f"vitconv: error: {path}: ") and words in lines[0], (name, command, lines[0])
        assert "Traceback" not in err and "internal error" not in err and "\x1b" not in err, (name, err)
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # inputs unchanged


def test_the_unforged_export_predicts_and_verifies(exported, tmp_path):
    """The baseline every forgery above departs from."""
    runs = fork_run([{"args": ["predict", exported, IMAGE, "--json"], "timeout": 120},
                     {"args": ["verify", GOLDEN, exported], "timeout": 120}], tmp_path)
    assert [r[0] for r in runs] == [0, 0], runs
    top = json.loads(runs[0][1])["predictions"][0]["top"]
    assert top[0]["label"].startswith("c") and abs(sum(t["probability"] for t in top) - 1) < 0.5
    assert np.isfinite([t["probability"] for t in top]).all() and runs[1][2] == ""


def test_labels_with_terminal_escapes_are_printed_escaped(exported, tmp_path):
    """Labels come from the file (its metadata): printed, they must not repaint the terminal."""
    labels = [f"\x1b[31mred {i}\x1b[0m\rover" for i in range(10)]
    path = _forge("esc.onnx", lambda m, f: _meta(m, "vitconv_labels", json.dumps(labels)))(exported, tmp_path)
    (code, out, err), (jcode, jout, _) = fork_run([{"args": ["predict", path, IMAGE], "timeout": 120},
                                                   {"args": ["predict", path, IMAGE, "--json"], "timeout": 120}],
                                                  tmp_path)
    assert code == 0 and jcode == 0, err
    assert "\x1b" not in out and "\r" not in out and "\\x1b[31mred" in out
    assert json.loads(jout)["predictions"][0]["top"][0]["label"] in labels  # the document keeps them, escaped by JSON
