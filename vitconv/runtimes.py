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

from .errors import BadInputError, first_line
from .formats.json_doc import parse_json

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


class OnnxRunner:
    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise BadInputError(f"verifying ONNX needs onnxruntime ({e})", path) from None
        try:
            self.session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BadInputError(f"not a loadable ONNX model ({first_line(e)})", path) from None
        inputs = self.session.get_inputs()
        if not inputs:
            raise BadInputError("ONNX model has no inputs", path)
        # Hugging Face-style exports name the image input 'pixel_values'; otherwise the first.
        self.input = next((i for i in inputs if i.name == "pixel_values"), inputs[0])
        self.input_name = self.input.name
        # vitconv's float16 exports say so in their metadata (``export --onnx --fp16``)
        precision = self.session.get_modelmeta().custom_metadata_map.get("precision", "")
        self.half = precision.startswith("float16")

    def static_size(self) -> Optional[int]:
        shape = self.input.shape
        if len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3]:
            return shape[2]
        return None

    def __call__(self, nchw: np.ndarray) -> np.ndarray:
        step = self.input.shape[0] if self.input.shape and isinstance(self.input.shape[0], int) else len(nchw)
        if step <= 0 or len(nchw) % step:  # a static batch that does not divide ours: one at a time
            step = 1
        # An export with a static batch size (often 1) is run chunk by chunk.
        outs = [self.session.run(None, {self.input_name: nchw[i:i + step]})[0]
                for i in range(0, len(nchw), step)]
        return np.concatenate([np.asarray(o) for o in outs], axis=0)


class TorchRunner:
    def __init__(self, module):
        self.module = module

    def __call__(self, nchw: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.module(torch.from_numpy(nchw))
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
