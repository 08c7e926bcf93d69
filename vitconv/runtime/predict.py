"""``vitconv predict``: what a model sees in an image, the first check after any conversion.

Any checkpoint vitconv reads, an ONNX graph or a TorchScript module: the image is
preprocessed the model's own way (:mod:`vitconv.runtime.preprocess`: from the file's metadata, else
its family), run, and reported as the top-k classes with their probabilities and labels
when the model has a classifier, else as the output embedding's norm and first values (the
pooled features, or a CLIP projection).

Images are decoded by Pillow, with its decompression-bomb limit made an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from vitconv.runtime import preprocess
from vitconv.config import ViTConfig
from vitconv.errors import BadInputError, first_line, one_line
from vitconv.runtime.labels import check_count, load_labels
from vitconv.runtime.labels import from_metadata as labels_from_metadata
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions
from vitconv.runtime.preprocess import Usage
from vitconv.layouts.canonical import parse_config
from vitconv.formats.provenance import Provenance
from vitconv.runtime.runners import MAX_IMAGE_SIZE, OnnxRunner, TorchRunner, artifact_kind, load_torchscript, require_input
from vitconv.lazy import lazy_module

loading = lazy_module("vitconv.conversion.loading")  # torch, for a checkpoint (not for ONNX)

PathLike = Union[str, os.PathLike]


@dataclass
class Prediction:
    image: str
    top: List[Tuple[int, str, float]] = field(default_factory=list)  # (class, label, probability)
    embedding_norm: Optional[float] = None
    embedding_head: List[float] = field(default_factory=list)  # the first values

    def to_dict(self) -> dict:
        d: dict = {"image": self.image}
        if self.top:
            d["top"] = [{"class": c, "label": label, "probability": p} for c, label, p in self.top]
        else:
            d["embedding"] = {"norm": self.embedding_norm, "first": self.embedding_head}
        return d

    def lines(self) -> List[str]:
        if self.top:
            # labels come from the file: a terminal escape in one must not repaint the terminal
            return [one_line(self.image)] + [f"  {p:7.2%}  {c:>5}  {one_line(label, 200)}" for c, label, p in self.top]
        head = ", ".join(f"{v:.4f}" for v in self.embedding_head)
        return [one_line(self.image), f"  embedding norm {self.embedding_norm:.4f}, first values [{head}]"]


@dataclass
class Predictor:
    """A model ready to run on images: ``run(nhwc float32) -> outputs``."""

    config: ViTConfig
    usage: Usage
    run: Callable[[np.ndarray], np.ndarray]
    runtime: str
    image_size: int
    source: str = ""  # the model file, for errors about what it computes


def open_predictor(path: PathLike, options: ReadOptions = ReadOptions(), **given: Any) -> Predictor:
    """``path`` as a predictor: a checkpoint through the canonical model, an ``.onnx`` in
    onnxruntime, a TorchScript module in torch (exports carry vitconv's metadata).

    ``options`` (:class:`~vitconv.conversion.options.ReadOptions`, varied by ``given``:
    ``image_size=``, ``num_heads=``, ``labels=``, ``overrides=``, as for ``open_checkpoint``): a
    checkpoint is read with them whole (``overrides``: what a bare state dict cannot record,
    ``arch`` and config fields); an export records its architecture, and takes ``image_size``
    and ``labels`` only."""
    options = dataclasses.replace(options, **given) if given else options
    image_size, labels = options.image_size, options.labels
    p = Path(path)
    require_input(p)
    kind = artifact_kind(p)
    if kind == "canonical":
        import torch

        with open_checkpoint(p, options) as ckpt:
            model, usage = loading.build_model(ckpt.config, ckpt.state_dict()), ckpt.usage

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
        return Predictor(model.config, usage, run, "torch (canonical model)", model.config.image_size, str(p))
    meta: Dict[str, str] = {}
    if kind == "onnx":
        runner = OnnxRunner(p)
        meta = dict(runner.session.get_modelmeta().custom_metadata_map)
        runtime = "onnxruntime (CPU)"
    else:
        runner = TorchRunner(load_torchscript(p, meta), p)
        runtime = "torch (TorchScript)"
    own = Provenance.from_metadata(meta)
    if own.config is None:
        raise BadInputError(f"{kind} file without vitconv metadata: its preprocessing and size are "
                            "unknown (export it with vitconv, or predict on the checkpoint)", p)
    cfg = parse_config(own.config, p)
    pre = preprocess.from_json(own.preprocessing, p) if own.preprocessing is not None else preprocess.TIMM_DEFAULT
    if isinstance(runner, OnnxRunner):  # what the graph says agrees with what its metadata says
        runner.check_channels(cfg.in_chans)
        width = runner.output_width()
        if cfg.num_classes and width is not None and width != cfg.num_classes:
            raise BadInputError(f"the graph's output has {width} values; its vitconv_config says "
                                f"{cfg.num_classes} classes", p)
    names = None
    if labels is not None:
        names = load_labels(labels, p)
    elif own.labels is not None:
        names = labels_from_metadata(own.labels, p)
    if names is not None:
        check_count(names, cfg.num_classes, p, "--labels" if labels is not None else "its vitconv_labels metadata")
    size = image_size or (getattr(runner, "static_size", lambda: None)() or cfg.image_size)
    if not 0 < size <= MAX_IMAGE_SIZE:
        raise BadInputError(f"image size {size} is beyond what a model runs at (at most {MAX_IMAGE_SIZE} px)", p)
    return Predictor(cfg, Usage(pre, tuple(names) if names else None),
                     lambda x: runner(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), runtime, size, str(p))


def classifies(cfg: ViTConfig) -> bool:
    """Whether the head's outputs are classes: a head with a bias. A bias-free head is a
    projection into an embedding space (CLIP's ``proj``), whose outputs are not logits."""
    return bool(cfg.num_classes) and cfg.head_bias


#: The raster formats ``predict`` decodes: Pillow's own decoders, none of which starts another
#: program. Pillow would also open EPS/PostScript (by running Ghostscript), and identify a file
#: by its bytes whatever its name: only these are tried.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def read_image(path: PathLike):
    """A decoded Pillow image, as 8-bit RGB (:func:`to_rgb8`); a file in none of
    :data:`IMAGE_FORMATS`, or a decompression bomb (more than Pillow's ``MAX_IMAGE_PIXELS``),
    is a :class:`BadInputError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    require_input(p)
    if p.is_dir():
        raise BadInputError("is a directory, not an image", p)
    try:
        with warnings.catch_warnings(), _decoders_quiet():
            warnings.simplefilter("ignore")  # Pillow's word on corrupt metadata: the one line below says it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p, formats=IMAGE_FORMATS) as img:
                img.load()
                return to_rgb8(img, p)
    except UnidentifiedImageError:
        raise BadInputError(f"not an image in a format predict reads ({', '.join(IMAGE_FORMATS)})", p) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInputError(f"image too large to decode ({first_line(e)})", p) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise BadInputError(f"image data is unreadable ({first_line(e)})", p) from None


@contextlib.contextmanager
def _decoders_quiet() -> Iterator[None]:
    """Standard error closed to the C decoders Pillow calls (libtiff and libjpeg write their
    complaints to file descriptor 2 themselves): a corrupt image is one line, the error raised."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no standard error to quieten
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


#: Rows of a 16-bit image scaled to 8 bits at a time (a bound on the temporary's size).
_ROWS = 256


def to_rgb8(img, where: Optional[PathLike] = None):
    """``img`` as the 8-bit RGB image its 8-bit twin would be: 16-bit grey (``I;16*``, and
    ``I``, which Pillow uses for 16-bit PNGs) scaled by 255/65535 (Pillow's own conversion
    clips it to white instead); a palette with transparency and the alpha modes drop alpha;
    CMYK and YCbCr by Pillow's conversion. Floating-point pixels (``F``) record no value
    range: refused."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(img)  # uint16 or int32, not float64: a 9400 px square is 177 MB, not 707 MB
        if mode == "I" and (v.min(initial=0) < 0 or v.max(initial=0) > 65535):
            raise BadInputError(f"{mode} image with values outside 0..65535: its range is unknown", where)
        out = np.empty(v.shape, np.uint8)
        for i in range(0, v.shape[0], _ROWS):  # round(v / 257), exact in integers: v / 257 is never k + 1/2
            out[i:i + _ROWS] = (v[i:i + _ROWS].astype(np.int64) + 128) // 257
        del v
        return Image.fromarray(out, "L").convert("RGB")
    if mode == "F":
        raise BadInputError("floating-point image (mode F): its value range is not recorded; save it as "
                            "8- or 16-bit", where)
    if mode == "P":
        img = img.convert("RGBA")  # a palette's transparency, then dropped as any alpha is
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise BadInputError(f"cannot convert a {mode} image to RGB ({first_line(e)})", where) from None


def display_name(path: PathLike) -> str:
    """A path as printable text: an undecodable byte of its name as ``\\xNN`` (valid UTF-8 and
    JSON, where the raw name would be neither)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def predict(model: Union[PathLike, Predictor], images: Sequence[PathLike], top_k: int = 5) -> List[Prediction]:
    """Top-``top_k`` classes (or the embedding) of ``model`` on each image file."""
    if top_k <= 0:
        raise BadInputError(f"--top-k must be positive, got {top_k}")
    pred = model if isinstance(model, Predictor) else open_predictor(model)
    pixels = [pred.usage.preprocessing.apply(read_image(i), pred.image_size) for i in images]
    out = np.asarray(pred.run(np.stack(pixels)), dtype=np.float64)
    names = pred.usage.labels
    if out.ndim != 2 or len(out) != len(images) or not np.isfinite(out).all():
        finite = "" if np.isfinite(out).all() else " with non-finite values"
        raise BadInputError(f"the model's output has shape {list(out.shape)}{finite}, not one finite row per "
                            f"image", pred.source or None)
    if classifies(pred.config) and (out.shape[1] != pred.config.num_classes or (names and len(names) != out.shape[1])):
        raise BadInputError(f"the model gives {out.shape[1]} values per image, but its config says "
                            f"{pred.config.num_classes} classes" + (f" and its labels {len(names)}" if names else ""),
                            pred.source or None)
    results = []
    for image, row in zip(images, out):
        if classifies(pred.config):
            e = np.exp(row - row.max())
            prob = e / e.sum()
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append(Prediction(display_name(image), [(int(c), names[c] if names else f"class {c}",
                                                            float(prob[c])) for c in order]))
        else:
            results.append(Prediction(display_name(image), embedding_norm=float(math.sqrt(float(row @ row))),
                                      embedding_head=[float(v) for v in row[:5]]))
    return results
