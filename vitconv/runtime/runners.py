"""Running what ``export`` writes: an ONNX graph in onnxruntime (CPU), a TorchScript module in
torch, each as ``runner(nchw float32) -> output``, for ``verify`` and ``predict``. A
TorchScript file written by vitconv carries its config, preprocessing and labels as the
extra file ``vitconv.json``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from vitconv.config import MAX_IMAGE_SIZE
from vitconv.errors import BadInputError, first_line
from vitconv.formats.json_doc import parse_json

PathLike = Union[str, os.PathLike]
#: The extra file of a vitconv TorchScript export: vitconv_config, vitconv_preprocessing, ...
TORCHSCRIPT_EXTRA = "vitconv.json"


def require_input(p: Path) -> None:
    """An input that exists and can be read to its end: a file or a model directory (a FIFO
    or a device would block or never end)."""
    if not p.exists():
        raise BadInputError("no such file", p)
    if not (p.is_file() or p.is_dir()):
        raise BadInputError("not a regular file", p)


def artifact_kind(path: PathLike) -> str:
    """``onnx``, ``torchscript`` or ``canonical`` (anything :func:`vitconv.load` reads)."""
    p = Path(path)
    require_input(p)
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise BadInputError(f"corrupt zip archive ({e})", p) from None
        # TorchScript archives carry their compiled code; torch.save archives do not.
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
    return "canonical"


def _elem_type(code: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(code).lower()
    except ValueError:
        return f"type {code}"


def check_onnx_file(path: Path):
    """The graph of ``path`` (without its weights), checked before onnxruntime opens it: it
    parses, and every external-data reference names a regular file beside it (not a FIFO that
    would block, nor a path outside the folder) and a range inside that file. Returns the
    ``ModelProto``."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:
        raise BadInputError(f"not a loadable ONNX model ({first_line(e)})", path) from None
    folder = path.parent.resolve()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        where = info.get("location", "")
        data = (path.parent / where)
        try:
            offset, length = int(info.get("offset") or 0), int(info.get("length") or 0)
        except ValueError:
            raise BadInputError(f"initializer {t.name!r}: external data offset/length are not integers", path) from None
        try:  # a name the file system refuses (a NUL, past 255 bytes) is the graph's problem too
            beside = bool(where) and not os.path.isabs(where) and data.resolve().is_relative_to(folder)
            kind = "file" if data.is_file() else ("other" if data.exists() else None)
            size = data.stat().st_size if kind == "file" else 0
        except (OSError, ValueError) as e:
            raise BadInputError(f"initializer {t.name!r}: external data {where[:60]!r} is not a usable file name "
                                f"({first_line(e)})", path) from None
        if not beside:
            raise BadInputError(f"initializer {t.name!r}: external data {where!r} is not a file beside the graph",
                                path)
        if kind != "file":
            what = "does not exist" if kind is None else "is not a regular file"
            raise BadInputError(f"initializer {t.name!r}: external data {where} {what}", path)
        if offset < 0 or length < 0 or offset + length > size:
            raise BadInputError(f"initializer {t.name!r}: external data range {offset}+{length} lies outside "
                                f"{where} ({size:,} bytes)", path)
    return model


class OnnxRunner:
    """An ONNX graph in onnxruntime (CPU), its image input checked against what vitconv feeds:
    NCHW float32 (an NHWC or integer input, as tf2onnx writes, is refused, naming it)."""

    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise BadInputError(f"verifying ONNX needs onnxruntime ({e})", path) from None
        self.path = path
        graph = check_onnx_file(path).graph
        weights = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in weights]
        if not inputs:
            raise BadInputError("ONNX model has no inputs", path)
        # Hugging Face-style exports name the image input 'pixel_values'; otherwise the first.
        proto = next((i for i in inputs if i.name == "pixel_values"), inputs[0])
        t = proto.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        if t.elem_type != 1 or len(dims) != 4:  # 1: FLOAT
            raise BadInputError(f"input {proto.name!r} is {_elem_type(t.elem_type)} {shown}: vitconv feeds an "
                                "image model NCHW float32", path)
        if any(d is not None and not 0 < d <= MAX_IMAGE_SIZE for d in dims[1:]) or (dims[0] or 1) <= 0:
            raise BadInputError(f"input {proto.name!r} has impossible dims {shown}", path)
        self.dims = dims
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions; its log would print escapes
        ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BadInputError(f"not a loadable ONNX model ({first_line(e)})", path) from None
        self.input = next(i for i in self.session.get_inputs() if i.name == proto.name)
        self.input_name = self.input.name
        # vitconv's float16 exports say so in their metadata (``export --onnx --fp16``)
        precision = self.session.get_modelmeta().custom_metadata_map.get("precision", "")
        self.half = precision.startswith("float16")

    def check_channels(self, in_chans: int) -> None:
        """The input's channel axis (static) holds ``in_chans``; an NHWC input says so."""
        c = self.dims[1]
        if c is not None and c != in_chans:
            layout = " (NHWC, as tf2onnx writes)" if self.dims[3] == in_chans else ""
            raise BadInputError(f"input {self.input_name!r} has {c} channels on axis 1{layout}: vitconv feeds "
                                f"NCHW with {in_chans}", self.path)

    def static_size(self) -> Optional[int]:
        h, w = self.dims[2], self.dims[3]
        return h if h is not None and h == w else None

    def output_width(self) -> Optional[int]:
        """The first output's last dim, when the graph fixes it."""
        shape = self.session.get_outputs()[0].shape
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    def __call__(self, nchw: np.ndarray) -> np.ndarray:
        step = self.dims[0] if self.dims[0] else len(nchw)
        if step <= 0 or len(nchw) % step:  # a static batch that does not divide ours: one at a time
            step = 1
        # An export with a static batch size (often 1) is run chunk by chunk.
        try:
            outs = [self.session.run(None, {self.input_name: nchw[i:i + step]})[0]
                    for i in range(0, len(nchw), step)]
        except Exception as e:  # the graph's own shapes or types refuse the input
            raise BadInputError(f"onnxruntime cannot run it on a {list(nchw.shape)} float32 input "
                                f"({first_line(e)})", self.path) from None
        return np.concatenate([np.asarray(o) for o in outs], axis=0)


class TorchRunner:
    def __init__(self, module, path: Optional[Path] = None):
        self.module, self.path = module, path

    def __call__(self, nchw: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            try:
                out = self.module(torch.from_numpy(nchw))
            except Exception as e:
                if self.path is None:  # an in-memory module: the caller's own
                    raise
                raise BadInputError(f"the TorchScript module cannot run on a {list(nchw.shape)} float32 input "
                                    f"({first_line(e)})", self.path) from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = out.get("logits", next(iter(out.values())))
        return out.detach().float().numpy()


def load_torchscript(path: Path, metadata: Optional[Dict[str, str]] = None):
    """The module, in eval mode; ``metadata`` (when given) receives the strings of a vitconv
    export's ``vitconv.json`` (none for other TorchScript files)."""
    import warnings

    import torch

    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        with warnings.catch_warnings():  # torch 2.9+ marks jit deprecated; artifacts still exist
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra).eval()
    except Exception as e:
        raise BadInputError(f"not a loadable TorchScript module ({first_line(e)})", path) from None
    if metadata is not None and extra[TORCHSCRIPT_EXTRA]:
        doc = parse_json(extra[TORCHSCRIPT_EXTRA], TORCHSCRIPT_EXTRA, path)
        if isinstance(doc, dict):
            metadata.update({str(k): str(v) for k, v in doc.items()})
    return module
