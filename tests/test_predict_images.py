"""``predict``'s image decoding: an explicit allow-list of raster formats (a PostScript file named
``cat.jpg`` never starts Ghostscript), images in other modes read as their 8-bit twins would be
(16-bit grey, palette with transparency, grey + alpha, RGBA), what has no 8-bit reading (float
pixels) refused in one line, an extreme aspect ratio in bounded memory, and names that are not
UTF-8 printed as valid JSON. Also: the Python API's labels are held to what a label file can say.

References: each twin is built by NumPy from the same seeded pixels (never by the conversion
under test), and decoded by Pillow's plain 8-bit path."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import vitconv
from cli_children import fork_run
from conftest import VITCONV, golden_path
from vitconv.errors import BadInputError
from vitconv.runtime.predict import open_predictor, predict

GOLDEN = golden_path("jax/tiny_token_p8_32.npz")


@pytest.fixture(scope="module")
def squash():
    return open_predictor(GOLDEN)


@pytest.fixture(scope="module")
def crop_model(tmp_path_factory):
    """A bare timm file (3 heads: it does not record them): timm's default preprocessing,
    shorter side then a centre crop."""
    out = tmp_path_factory.mktemp("crop") / "timm.safetensors"
    vitconv.convert(GOLDEN, out, to="timm")
    pred = open_predictor(out, num_heads=3)
    assert pred.usage.preprocessing.resize == "shortest"
    return out


def _pixels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _probs(pred, path) -> np.ndarray:
    (r,) = predict(pred, [path], top_k=10)
    return np.array([p for _, _, p in sorted(r.top)])


def _one_line(r, code, *words):
    assert r[0] == code, r
    lines = r[2].splitlines()
    assert len(lines) == 1 and "Traceback" not in r[2] and "internal error" not in r[2] and "\x1b" not in r[2], r
    for w in words:
        assert w in lines[0], (w, lines[0])


# --------------------------------------------------------------------------- no external program
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


def _dos_eps() -> bytes:  # the binary EPS header (C5D0D3C6) before the PostScript
    return struct.pack("<IIIIIIIH", 0xC6D3D0C5, 30, len(EPS), 0, 0, 0, 0, 0xFFFF) + EPS


def test_postscript_and_other_formats_named_as_images_never_run_a_program(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "GHOSTSCRIPT_RAN"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    files = {"cat.jpg": EPS, "cat.eps": EPS, "page.ps": EPS.replace(b" EPSF-3.0", b""), "dos.png": _dos_eps(),
             "doc.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
             "pic.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
             "pic.xbm": b"#define a_width 8\n#define a_height 1\nstatic char a_bits[] = { 0xff };\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # the fake gs is what Pillow would run: decoding the EPS unrestricted does start it
    subprocess.run([sys.executable, "-c", "import sys\nfrom PIL import Image\ntry:\n Image.open(sys.argv[1]).load()\n"
                    "except Exception:\n pass", str(tmp_path / "cat.jpg")], env=env, timeout=60)
    assert marker.exists()
    marker.unlink()
    for name in files:
        r = subprocess.run([VITCONV, "predict", str(GOLDEN), str(tmp_path / name)], env=env, capture_output=True,
                           text=True, timeout=120)
        _one_line((r.returncode, r.stdout, r.stderr), 2, name, "not an image in a format predict reads")
        assert not marker.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, "bin"])


# --------------------------------------------------------------------------- modes read as 8 bits
def test_sixteen_bit_grey_reads_as_its_eight_bit_twin(tmp_path, squash):
    from PIL import Image

    v = _pixels((40, 56))
    Image.fromarray(v, "L").save(tmp_path / "twin8.png")
    want = _probs(squash, tmp_path / "twin8.png")
    wide = v.astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "grey16.png")  # a 16-bit PNG
    lsb = np.minimum(wide.astype(np.int64) + 100, 65535).astype(np.uint16)  # low bits that round away
    Image.fromarray(lsb).save(tmp_path / "grey16_lsb.png")
    Image.fromarray(wide).save(tmp_path / "grey16.tif")
    Image.fromarray(wide.astype(np.int32), "I").save(tmp_path / "grey32.tif")  # mode I, 16-bit values
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode in ("I;16", "I")
    for name in ("grey16.png", "grey16_lsb.png", "grey16.tif", "grey32.tif"):
        assert np.abs(_probs(squash, tmp_path / name) - want).max() < 1e-12, name
    # Pillow's own conversion (what predict did) clips the 16-bit image to white: far from the twin
    with Image.open(tmp_path / "grey16.png") as im:
        im.convert("RGB").save(tmp_path / "clipped.png")
    assert np.abs(_probs(squash, tmp_path / "clipped.png") - want).max() > 1e-3


def test_palette_alpha_and_cmyk_images_read_as_their_rgb_twins(tmp_path, squash):
    from PIL import Image

    palette = _pixels((16, 3), seed=1)
    index = _pixels((30, 44), seed=2) % 16
    rgb = palette[index]  # the twin, by NumPy indexing
    Image.fromarray(rgb, "RGB").save(tmp_path / "twin.png")
    want = _probs(squash, tmp_path / "twin.png")
    p = Image.fromarray(index.astype(np.uint8), "P")
    p.putpalette(palette.reshape(-1).tolist())
    p.save(tmp_path / "palette_trns.png", transparency=bytes([0, 128] + [255] * 14))  # tRNS: alpha per entry
    p.save(tmp_path / "palette.gif", transparency=3)  # GIF: one transparent index
    alpha = _pixels((30, 44), seed=3)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    with Image.open(tmp_path / "palette_trns.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    for name in ("palette_trns.png", "palette.gif", "rgba.png"):
        assert np.abs(_probs(squash, tmp_path / name) - want).max() < 1e-12, name
    grey = _pixels((30, 44), seed=4)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    assert np.abs(_probs(squash, tmp_path / "la.png") - _probs(squash, tmp_path / "grey.png")).max() < 1e-12
    Image.fromarray(rgb, "RGB").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    (r,) = predict(squash, [tmp_path / "cmyk.jpg"])
    assert 0 < sum(p for _, _, p in r.top) <= 1 + 1e-9


def test_float_pixels_are_refused_in_one_line(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(BadInputError, match="f.tif: floating-point image"):
        predict(GOLDEN, [tmp_path / "f.tif"])


def _png(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def test_extreme_aspect_ratios_run_in_bounded_memory(tmp_path, crop_model):
    """A 1 x 1,000,000 strip (2 KB) on a shortest-side model was resized whole (gigapixels)."""
    from PIL import Image

    colour = bytes([200, 30, 90])
    (tmp_path / "wide.png").write_bytes(_png(1_000_000, 1, b"\x00" + colour * 1_000_000))
    (tmp_path / "tall.png").write_bytes(_png(1, 1_000_000, (b"\x00" + colour) * 1_000_000))
    Image.new("RGB", (64, 64), tuple(colour)).save(tmp_path / "square.png")
    assert (tmp_path / "wide.png").stat().st_size < 10_000
    jobs = [{"args": ["predict", crop_model, tmp_path / n, "--json", "--num-heads", "3"], "memory": 3 << 30,
             "timeout": 120}
            for n in ("wide.png", "tall.png", "square.png")]
    runs = fork_run(jobs, tmp_path)
    for code, out, err in runs:
        assert code == 0 and err == "", (code, err)
    tops = [json.loads(out)["predictions"][0]["top"] for _, out, _ in runs]
    # a constant colour resamples to itself: the strips are the square
    for top in tops[:2]:
        assert [t["class"] for t in top] == [t["class"] for t in tops[2]]
        assert max(abs(a["probability"] - b["probability"]) for a, b in zip(top, tops[2])) < 1e-9


def test_forged_dimensions_are_a_decompression_bomb(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png(200_000, 200_000, b"\x00" * 10))
    r = fork_run([{"args": ["predict", GOLDEN, tmp_path / "bomb.png"], "memory": 2 << 30, "timeout": 60}], tmp_path)[0]
    _one_line(r, 2, "bomb.png", "image too large to decode")


def test_json_with_a_name_that_is_not_utf8_is_valid_json(tmp_path):
    from PIL import Image

    name = os.fsdecode(b"caf\xe9 \xff.png")
    Image.fromarray(_pixels((20, 20, 3)), "RGB").save(tmp_path / name)
    r = subprocess.run([os.fsencode(VITCONV), b"predict", os.fsencode(GOLDEN), os.fsencode(tmp_path / name), b"--json"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.decode("utf-8"))  # strict UTF-8: no raw byte passes
    assert doc["predictions"][0]["image"].endswith("caf\\xe9 \\xff.png")
    r = subprocess.run([os.fsencode(VITCONV), b"predict", os.fsencode(GOLDEN), os.fsencode(tmp_path / name)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and "caf\\xe9 \\xff.png" in r.stdout.decode("utf-8")


# --------------------------------------------------------------------------- the Python API's labels
@pytest.mark.parametrize("labels,words", [
    (list(range(10)), "labels[0] is int"),
    (["a"] * 9 + [None], "labels[9] is NoneType"),
    (["a"] * 9 + ["two\nlines"], "labels[9]"),
    (["a"] * 9 + ["  "], "labels[9]"),
    ([], "labels is an empty list"),
    (["a"] * 9, "9 labels, but the model has 10"),
])
def test_api_labels_must_be_what_a_label_file_can_say(tmp_path, labels, words):
    for out in (tmp_path / "x.safetensors", tmp_path / "hf"):
        with pytest.raises(BadInputError, match=words.replace("[", r"\[").replace("]", r"\]")):
            vitconv.convert(GOLDEN, out, labels=labels)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    named = [f"class {i}" for i in range(10)]  # the same call with strings works and reads back
    vitconv.convert(GOLDEN, tmp_path / "ok.safetensors", labels=named)
    assert list(vitconv.open_checkpoint(tmp_path / "ok.safetensors").usage.labels) == named
