"""Hostile and broken inputs through every command that reads them (``inspect``, ``convert``,
``verify``), as real child processes under a 2 GiB address-space limit and a time limit.

Each case must end in one stderr line naming the file and the problem, exit 2, no
traceback, no output and no temporary file left, and the input byte for byte as it was.
The few that are legal but odd (a 2.5 GiB zip bomb in optimizer state that conversion
never reads) must succeed inside the same limits. The corpus is generated here from the
shipped golden checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

import vitconv
from cli_children import fork_run
from conftest import golden_path

GOLDEN = golden_path("jax/tiny_token_p8_32.npz")
MEMORY = 2 << 30  # RLIMIT_AS for every child: a read of a forged size fails instead of swapping
TIMEOUT = 90  # seconds per child; a hang dies by SIGALRM (status -14)
COMMANDS = ("inspect", "convert", "verify")


def _golden() -> Dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npy_header(shape: Tuple[int, ...], descr: str = "<f4") -> bytes:
    """A version 1.0 ``.npy`` header (magic, version, length, dict padded to 64 bytes)."""
    d = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    d = d.ljust(64 * ((len(d) + 10) // 64 + 1) - 10 - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d


def _optimizer_npz(p: Path, extra: Callable[[zipfile.ZipFile], None]) -> Path:
    """The golden model under ``opt/target/`` (vit_jax's training checkpoints), optimizer state
    under ``opt/state/`` written by ``extra``; level 1 deflate, which zeros pass through fast."""
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=zlib.Z_BEST_SPEED) as z:
        for k, v in _golden().items():
            z.writestr(f"opt/target/{k}.npy", _npy(v))
        extra(z)
    return p


def forged_optimizer_member(d: Path) -> Path:
    """A member whose 64-byte header declares a 4 TiB array (1 << 40 float32s)."""
    def extra(z):
        z.writestr("opt/state/momentum.npy", _npy_header((1 << 40,)) + bytes(64))
    return _optimizer_npz(d / "forged_optimizer.npz", extra)


def zip_bomb_optimizer_member(d: Path) -> Path:
    """2.5 GiB of zeros deflated to a few MB, declared honestly, in optimizer state."""
    n = (5 << 30) // 2 // 4

    def extra(z):
        with z.open("opt/state/bomb.npy", "w", force_zip64=True) as w:
            w.write(_npy_header((n,)))
            chunk = bytes(64 << 20)
            for _ in range(n * 4 // len(chunk)):
                w.write(chunk)
    return _optimizer_npz(d / "bomb_optimizer.npz", extra)


def duplicate_member(d: Path) -> Path:
    p = d / "duplicate.npz"
    with zipfile.ZipFile(GOLDEN) as src, zipfile.ZipFile(p, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr("cls.npy", _npy(np.zeros((1, 1, 48), np.float32)))
    return p


def npy_file(d: Path) -> Path:
    np.save(d / "weights.npy", np.zeros(3, np.float32))
    return d / "weights.npy"


def fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.npz")
    return d / "pipe.npz"


def _canonical(d: Path, name: str, edit: Callable[[dict], object]) -> Path:
    """The golden model as a canonical safetensors file whose ``vitconv_config`` ``edit`` rewrites
    (it returns the new JSON text or a dict)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = d / f"{name}.good.safetensors"
    vitconv.convert(GOLDEN, good, hash_source=False)
    with safe_open(good, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    good.unlink()
    new = edit(json.loads(meta["vitconv_config"]))
    meta["vitconv_config"] = new if isinstance(new, str) else json.dumps(new)
    save_file(tensors, d / f"{name}.safetensors", metadata=meta)
    return d / f"{name}.safetensors"


def _hf(d: Path, name: str, edit: Callable[[str], str]) -> Path:
    """The golden model as a Hugging Face directory whose config.json text ``edit`` rewrites."""
    out = d / name
    vitconv.convert(GOLDEN, out, to="hf", hash_source=False)
    cfg = out / "config.json"
    cfg.write_text(edit(cfg.read_text()))
    return out


def _set(key: str, raw: str) -> Callable[[str], str]:
    """config.json with ``key`` set to the raw JSON text ``raw`` (``1e400`` stays as written)."""
    def edit(text: str) -> str:
        d = json.loads(text)
        d[key] = "@@"
        return json.dumps(d).replace('"@@"', raw)
    return edit


NESTED = "[" * 100_000 + "]" * 100_000


def _sparse_config(d: Path) -> Path:
    out = _hf(d, "hf_huge_config", lambda t: t)
    with open(out / "config.json", "r+b") as f:
        f.truncate(200 << 20)  # 200 MB of NULs, sparse: no disk used
    return out


def _index(d: Path, name: str, weight_map: Dict[str, str]) -> Path:
    p = d / name
    p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return p


def _index_cycle(d: Path) -> Path:
    _index(d, "b.safetensors.index.json", {"cls_token": "a.safetensors.index.json"})
    return _index(d, "a.safetensors.index.json", {"cls_token": "b.safetensors.index.json"})


def _stored_as(d: Path, name: str, dtype: str) -> Path:
    """The golden model with its head kernel stored as ``dtype``: nothing a writer takes."""
    a = _golden()
    a["head/kernel"] = np.full(a["head/kernel"].shape, "ab", "U2") if dtype == "U2" else a["head/kernel"].astype(dtype)
    return _savez(d / f"{name}.npz", a)


def _shape_past_int64(d: Path) -> Path:
    """A member whose dimensions pass 2**63 while their product is 0 (the size check passes)."""
    p = d / "past_int64.npz"
    with zipfile.ZipFile(p, "w") as z:
        for k, v in _golden().items():
            z.writestr(f"{k}.npy", _npy_header((2 ** 64, 2 ** 64, 0)) if k == "cls" else _npy(v))
    return p


def _preprocessor(d: Path, name: str, **values) -> Path:
    """The golden model as a Hugging Face directory whose preprocessor_config.json has ``values``."""
    out = _hf(d, name, lambda t: t)
    doc = json.loads((out / "preprocessor_config.json").read_text())
    doc.update(values)
    (out / "preprocessor_config.json").write_text(json.dumps(doc).replace('"@@"', "1" + "0" * 400))
    return out


#: name -> (builder, words the one-line error must contain)
CORPUS: Dict[str, Tuple[Callable[[Path], Path], str]] = {
    # weights no writer takes: refused naming the key before any header is laid out
    "dtype_text": (lambda d: _stored_as(d, "text", "U2"), "head/kernel has dtype <U2, expected floating point"),
    "dtype_complex": (lambda d: _stored_as(d, "complex", "complex64"), "head/kernel has dtype complex64"),
    "dtype_longdouble": (lambda d: _stored_as(d, "longdouble", "longdouble"), "expected floating point (float16"),
    "shape_past_int64": (_shape_past_int64, "cls (18446744073709551616, 18446744073709551616, 0)"),
    "preprocessor_zero_edge": (lambda d: _preprocessor(d, "zero_edge", do_center_crop=True,
                                                       size={"shortest_edge": 0}, crop_size={"height": 32}),
                               "preprocessor_config.json: unusable values (float division by zero)"),
    "preprocessor_resample_list": (lambda d: _preprocessor(d, "resample_list", resample=[2]),
                                   "resample [2] is not a PIL filter number"),
    "preprocessor_400_digits": (lambda d: _preprocessor(d, "digits", image_mean=["@@", 0, 0]),
                                "preprocessor_config.json: unusable values"),
    "index_long_shard": (lambda d: _index(d, "long.safetensors.index.json", {"cls_token": "a" * 300 + ".safetensors"}),
                         "named by the index is missing"),
    "forged_optimizer_member": (forged_optimizer_member, "declares float32(1099511627776,)"),
    "duplicate_member": (duplicate_member, "member 'cls' appears twice"),
    "npy_file": (npy_file, "not a checkpoint vitconv can read"),
    "fifo": (fifo, "not a regular file"),
    "config_depth_1e9": (lambda d: _canonical(d, "depth", lambda c: {**c, "depth": 10**9}),
                         "vitconv_config says depth 1000000000, but the file holds 2 blocks"),
    "config_width_1e9": (lambda d: _canonical(d, "width", lambda c: {**c, "width": 10**9}),
                         "disagree with the architecture"),
    "config_heads_0": (lambda d: _canonical(d, "heads", lambda c: {**c, "num_heads": 0}),
                       "num_heads must be positive"),
    "config_nested": (lambda d: _canonical(d, "nested", lambda c: NESTED), "nested deeper"),
    "config_not_json": (lambda d: _canonical(d, "text", lambda c: "{depth: 2"), "not valid JSON"),
    "hf_nested": (lambda d: _hf(d, "hf_nested", _set("id2label", NESTED)), "nested deeper"),
    "hf_huge_config": (_sparse_config, "more than the 67,108,864 a JSON document"),
    "index_self": (lambda d: _index(d, "self.safetensors.index.json", {"cls_token": "self.safetensors.index.json"}),
                   "another index, not a weights file"),
    "index_cycle": (_index_cycle, "another index, not a weights file"),
    "index_nested": (lambda d: (d / "n.safetensors.index.json").write_text(NESTED) and d / "n.safetensors.index.json",
                     "nested deeper"),
}


#: Hugging Face directories whose config.json has one value replaced: name -> (key, the raw
#: JSON written for it, words of the error)
HF_EDITS = {
    "hf_heads_0": ("num_attention_heads", "0", "0 heads do not divide the attention width 48"),
    "hf_heads_text": ("num_attention_heads", '"twelve"', "num_attention_heads 'twelve' is not an integer"),
    "hf_heads_null": ("num_attention_heads", "null", "num_attention_heads None is not an integer"),
    "hf_heads_1e400": ("num_attention_heads", "1e400", "num_attention_heads inf is not an integer"),
    "hf_layers_1e9": ("num_hidden_layers", "1000000000", "num_hidden_layers=1000000000 (the weights: 2)"),
    "hf_width_negative": ("hidden_size", "-5", "hidden_size=-5 (the weights: 48)"),
    "hf_eps_text": ("layer_norm_eps", '"small"', "layer_norm_eps 'small' is not a small non-negative number"),
}
CORPUS.update({name: (lambda d, n=name, k=key, raw=raw: _hf(d, n, _set(k, raw)), words)
               for name, (key, raw, words) in HF_EDITS.items()})


def _fingerprint(p: Path) -> Dict[str, str]:
    """Every file under ``p`` (or ``p`` itself) with its sha256; a FIFO by its kind only."""
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    out = {}
    for f in files:
        if f.is_fifo():
            out[str(f)] = "fifo"
        elif f.is_file():
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, (build, _) in CORPUS.items():
        (d / name).mkdir()
        out[name] = build(d / name)
    return out


def _run(jobs: List[dict], tmp_path: Path) -> List[list]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    for j in jobs:
        j.setdefault("memory", MEMORY)
        j.setdefault("timeout", TIMEOUT)
    return fork_run(jobs, logs)


def _args(command: str, src: Path, out: Path) -> List[str]:
    return {"inspect": ["inspect", src], "convert": ["convert", src, out / "m.safetensors"],
            "verify": ["verify", src]}[command]


def test_hostile_inputs_one_line_exit_2_bounded(corpus, tmp_path):
    before = {n: _fingerprint(p) for n, p in corpus.items()}
    outs, jobs, names = {}, [], []
    for name, src in corpus.items():
        for command in COMMANDS:
            out = tmp_path / "out" / f"{name}-{command}"
            out.mkdir(parents=True)
            outs[name, command] = out
            jobs.append({"args": _args(command, src, out)})
            names.append((name, command))
    results = _run(jobs, tmp_path)
    failures = []
    for (name, command), (code, stdout, stderr) in zip(names, results):
        words, shown = CORPUS[name][1], corpus[name].name
        lines = stderr.splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("vitconv: error: ")
              and shown in lines[0] and words in lines[0] and "Traceback" not in stderr
              and os.listdir(outs[name, command]) == [])
        if command != "inspect":
            ok = ok and stdout == ""
        if not ok:
            failures.append(f"{name} {command}: exit {code}, stderr {stderr[-400:]!r}")
    assert not failures, "\n".join(failures)
    assert {n: _fingerprint(p) for n, p in corpus.items()} == before  # inputs untouched


def _onnx_external(p: Path, location: str) -> Path:
    """A one-node graph whose initializer's data lies in an external file named ``location``."""
    from onnx import TensorProto, helper, numpy_helper

    t = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "g",
                              [x], [y], initializer=[t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    p.write_bytes(model.SerializeToString())
    return p


def _tiff(p: Path, **save) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((23, 31, 3)) * 255).astype("uint8")).save(buf, "TIFF", **save)
    return buf.getvalue()


def _bad_huffman(p: Path) -> Path:
    """A JPEG-compressed TIFF whose Huffman table is bogus: libtiff and libjpeg say so on fd 2."""
    raw = bytearray(_tiff(p, compression="jpeg"))
    raw[raw.index(b"\xff\xc4") + 4] = 0x7F  # the first DHT's class and id: none such
    p.write_bytes(raw)
    return p


def _other_commands(d: Path) -> List[Tuple[str, List[object], str, str]]:
    """``(case, args, name the line must show, words it must contain)`` for the commands
    beyond inspect, convert and verify, each input made here."""
    from PIL import Image

    Image.new("RGB", (40, 30), "gray").save(d / "img.png")
    golden_dir = d / "golden_bad"
    golden_dir.mkdir()
    (golden_dir / "manifest.json").write_text(json.dumps({"cases": [{"name": "a"}]}))
    nested_dir = d / "golden_nested"
    nested_dir.mkdir()
    (nested_dir / "manifest.json").write_text(NESTED)
    np.savez(d / "input.npz", x=np.zeros((1, 32, 32, 3), np.float32))
    np.save(d / "logits.npy", np.zeros((1, 10), np.float32))
    (d / "huge.npy").write_bytes(_npy_header((1 << 40,)) + bytes(64))
    (d / "nested.jsonl").write_text(NESTED + "\n")
    (d / "nested_set.jsonl").write_text(json.dumps({"src": str(GOLDEN), "dst": str(d / "o.safetensors"),
                                                    "set": "act=" + "[" * 100_000}) + "\n")
    (d / "wide.csv").write_text("src,dst\n" + "a" * 200_000 + ",o.safetensors\n")
    long = d / ("a" * 300 + ".npz")
    (d / "empty.onnx").write_bytes(b"")
    add = ["golden", "add", "c1", GOLDEN, "--expected-logits", d / "logits.npy", "--source", "t",
           "--dir", d / "golden_new"]
    return [
        ("onnx_nul_location", ["verify", GOLDEN, _onnx_external(d / "nul.onnx", "w\x00.bin")], "nul.onnx",
         "external data 'w\\x00.bin' is not a usable file name"),
        ("onnx_long_location", ["predict", _onnx_external(d / "long.onnx", "a" * 5000), d / "img.png"], "long.onnx",
         "is not a usable file name"),
        ("onnx_empty", ["inspect", d / "empty.onnx"], "empty.onnx", "not an ONNX model: it holds no graph"),
        ("tiff_bad_huffman", ["predict", GOLDEN, _bad_huffman(d / "huffman.tif")], "huffman.tif",
         "image data is unreadable"),
        ("golden_case_schema", ["golden", "check", "--dir", golden_dir], "manifest.json",
         "case 1: 'checkpoint' missing or not a string"),
        ("golden_nested", ["golden", "check", "--dir", nested_dir], "manifest.json", "nested deeper"),
        ("golden_npz_input", [*add, "--input", d / "input.npz"], "input.npz", "an .npz archive, not one array"),
        ("golden_forged_npy", [*add, "--input", d / "huge.npy"], "huge.npy", "not a readable .npy array"),
        ("batch_nested_line", ["batch", d / "nested.jsonl"], "nested.jsonl", "nested deeper"),
        ("batch_nested_set", ["batch", d / "nested_set.jsonl"], "nested_set.jsonl", "nested deeper"),
        ("batch_wide_csv_field", ["batch", d / "wide.csv"], "wide.csv", "not CSV (field larger than field limit"),
        ("name_too_long", ["inspect", long], "in/" + "a" * 40, "file name too long"),
        ("image_size_1e30", ["convert", GOLDEN, d / "o.safetensors", "--image-size", 10 ** 30], GOLDEN.name,
         "up to 8192"),
        ("url_refused", ["convert", GOLDEN, "ftp://127.0.0.1:1/o.safetensors"], "ftp://127.0.0.1:1/o.safetensors",
         "cannot connect"),
    ]


def test_other_commands_one_line_exit_2_bounded(tmp_path):
    """predict, golden and batch on broken inputs, names the file system refuses, an
    --image-size past any model and a URL nothing answers: each one stderr line (a C decoder's
    own complaints on fd 2 included) naming the file, exit 2, never an internal error."""
    d = tmp_path / "in"
    d.mkdir()
    cases = _other_commands(d)
    before = _fingerprint(d)
    results = _run([{"args": args} for _, args, _, _ in cases], tmp_path)
    failures = []
    for (case, _, shown, words), (code, _, stderr) in zip(cases, results):
        lines = stderr.splitlines()
        if not (code == 2 and len(lines) == 1 and lines[0].startswith("vitconv: error: ")
                and shown in lines[0] and words in lines[0]):
            failures.append(f"{case}: exit {code}, stderr {stderr[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert _fingerprint(d) == before
    assert not (d / "golden_new").exists() and not (d / "o.safetensors").exists()


def test_odd_images_predict_quietly_within_the_limits(tmp_path):
    """Legal, if odd: a TIFF whose EXIF block is corrupt (Pillow warns) and a 9400 px square
    16-bit PNG, 172 KB on disk. Both predict with nothing on stderr under the 2 GiB limit; the
    16-bit one is scaled to 8 bits a band at a time (it needed 2.5 GB as float64)."""
    raw = bytearray(_tiff(tmp_path / "x.tif"))
    raw[9] = 130  # the first directory's entry count: past the file, as EXIF data
    (tmp_path / "exif.tif").write_bytes(raw)
    side = 9400

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = zlib.compress(b"".join(b"\0" + bytes(2 * side) for _ in range(side)), 9)
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))  # 16-bit grey
    (tmp_path / "grey16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    results = _run([{"args": ["predict", GOLDEN, tmp_path / "exif.tif"]},
                    {"args": ["predict", GOLDEN, tmp_path / "grey16.png"]}], tmp_path)
    for code, stdout, stderr in results:
        assert code == 0 and stderr == "" and stdout, (code, stderr)


def test_verify_checks_its_second_argument_before_any_work(corpus, tmp_path):
    """A missing or unreadable CONVERTED is named before the source is even opened: a
    hostile source is not reached, and a FIFO is not opened."""
    jobs = [{"args": ["verify", corpus["forged_optimizer_member"], tmp_path / "missing.safetensors"]},
            {"args": ["verify", GOLDEN, corpus["fifo"]]}]
    (a, b) = _run(jobs, tmp_path)
    assert a[0] == 2 and a[2].strip().endswith("missing.safetensors: no such file"), a
    assert b[0] == 2 and b[2].strip().endswith("pipe.npz: not a regular file"), b


def test_zip_bomb_in_optimizer_state_is_never_read(corpus, tmp_path):
    """Legal, if odd: 2.5 GiB of optimizer state outside the model. Every command succeeds
    under the 2 GiB limit, so none of them inflates it."""
    src = zip_bomb_optimizer_member(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    results = _run([{"args": ["inspect", src]}, {"args": ["convert", src, out / "m.safetensors"]},
                    {"args": ["verify", src, out / "m.safetensors"]}], tmp_path)
    for code, stdout, stderr in results:
        assert code == 0 and stderr == "", (code, stderr)
    assert "1 keys outside the model left out (optimizer state)" in results[1][1]
    assert "ok" in results[2][1].lower()
    assert sorted(os.listdir(out)) == ["m.safetensors"]


# ---- valid but unusual: the same model, however it is stored --------------------------------

def _savez(p: Path, arrays: Dict[str, np.ndarray], compressed: bool = False) -> Path:
    with open(p, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return p


def _timm_state(d: Path) -> dict:
    from safetensors.torch import load_file

    vitconv.convert(GOLDEN, d / "timm.safetensors", to="timm", hash_source=False)
    return load_file(d / "timm.safetensors")


def test_valid_but_unusual_inputs_convert_to_the_same_model(tmp_path):
    """Compressed, Fortran-order and big-endian ``.npz`` members, nested ``.pth`` dicts (``model``,
    ``state_dict``, ``module.``), float16 weights, and a name with spaces and non-ASCII letters:
    each converts through the CLI (limits as above) to exactly the plain conversion's tensors
    (float16: the same values rounded to float16)."""
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "src"
    src.mkdir()
    g = _golden()
    timm = _timm_state(src)
    variants = {
        "compressed.npz": _savez(src / "compressed.npz", g, compressed=True),
        "fortran.npz": _savez(src / "fortran.npz", {k: np.asfortranarray(v) for k, v in g.items()}),
        "big_endian.npz": _savez(src / "big_endian.npz", {k: v.astype(">f4") for k, v in g.items()}),
        "mon modèle ViT (copie).npz": _savez(src / "mon modèle ViT (copie).npz", g),
        "nested_model.pth": src / "nested_model.pth",
        "nested_state_dict.pth": src / "nested_state_dict.pth",
        "half.pth": src / "half.pth",
    }
    torch.save({"model": {f"module.{k}": v for k, v in timm.items()}, "epoch": 7}, variants["nested_model.pth"])
    torch.save({"state_dict": timm, "optimizer": {"lr": 0.1}}, variants["nested_state_dict.pth"])
    torch.save({k: v.half() for k, v in timm.items()}, variants["half.pth"])
    want = load_file(vitconv.convert(GOLDEN, tmp_path / "want.safetensors", hash_source=False).output)
    out = tmp_path / "out"
    out.mkdir()
    names = sorted(variants)
    heads = lambda n: ["--num-heads", "3"] if n.endswith(".pth") else []  # a bare timm file: 16-dim heads
    res = _run([{"args": ["convert", variants[n], out / f"{i}.safetensors", *heads(n)]}
                for i, n in enumerate(names)], tmp_path)
    for i, (n, (code, stdout, stderr)) in enumerate(zip(names, res)):
        assert code == 0 and stderr == "", (n, stderr)
        got = load_file(out / f"{i}.safetensors")
        assert got.keys() == want.keys(), n
        for k, w in want.items():
            expect = w.half() if n == "half.pth" else w
            assert got[k].dtype == expect.dtype and torch.equal(got[k], expect), (n, k)


def test_safetensors_detected_whatever_its_header_length(tmp_path):
    """A safetensors header length whose low byte is 0x80 starts the file with a pickle's PROTO
    byte. Every low byte 0..255 (the header padded with spaces, as the format allows) reads as
    safetensors with its vitconv config; legacy torch pickles of protocols 2-5 still read as
    pickles; and the 0x80 file goes through inspect, convert and verify as a user runs them."""
    from vitconv.formats.open import sniff
    from vitconv.conversion.pipeline import open_checkpoint

    good = tmp_path / "good.safetensors"
    vitconv.convert(GOLDEN, good, hash_source=False)
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8:8 + n].rstrip(b" "), raw[8 + n:]
    want = vitconv.load(good).config
    d = tmp_path / "lengths"
    d.mkdir()
    for low in range(256):
        pad = (low - len(header)) % 256
        blob = header + b" " * pad
        assert len(blob) % 256 == low
        p = d / f"h{low:02x}.safetensors"
        p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        assert p.read_bytes()[0] == low
        assert sniff(p) == "safetensors", low
        with open_checkpoint(p) as ckpt:
            assert ckpt.layout.name == "canonical" and ckpt.config == want, low
    import torch

    for protocol in (2, 3, 4, 5):
        p = d / f"legacy{protocol}.pth"
        torch.save({"w": torch.zeros(3)}, p, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        assert sniff(p) == "pickle", protocol
    src, out = d / "h80.safetensors", tmp_path / "out"
    out.mkdir()
    res = _run([{"args": ["inspect", src]}, {"args": ["convert", src, out / "m.safetensors", "--to", "timm"]},
                {"args": ["verify", GOLDEN, src]}], tmp_path)
    for code, stdout, stderr in res:
        assert code == 0 and stderr == "", stderr
    assert "layout   canonical" in res[0][1] and "audit    ok" in res[0][1]
